"""DM generator: a DiT-style denoiser over high-resolution latent frames.

Shapes: B batch, T frames, C latent channels, H W latent height/width, p patch,
N = (H/p)(W/p) tokens per frame, L = T*N, D generator width, m planning tokens per frame,
E planner width.

Each block: spatial self-attention (each frame alone); temporal attention (each spatial
position across frames) or, in the paper's /ST variant, spatio-temporal attention, both with
Identity Attention (reference tokens see only reference tokens); cross-attention from each
frame's tokens to *its own frame's* planning tokens; MLP. Every sublayer is modulated per frame
by the timestep (adaptive shift/scale/gate, zero-initialised as in DiT) and the MLP also by the
frame's mean planning signal.

Choices the paper leaves open, and ours:
- cross-attention is frame-aligned (frame t reads planning tokens of frame t): the planner has
  already mixed information across frames, it costs T times less than reading all frames, and it
  keeps a reference frame independent of the masked frames' planning tokens;
- time is encoded by the axial RoPE's time axis (relative, so clip length can grow across
  stages without new parameters); reference frames get timestep 0 (they are clean);
- the learned null planning signal is one vector of the planner's width, used for classifier-free
  guidance dropout and for ``dm`` stages that train without a planner.

Not in the paper, behind ``reference_path`` (off in the paper presets; ``ReferencePath``): every
frame also sees its nearest reference frame on each side as input channels, with their
distances, and its x0 prediction is the linear blend of those two frames plus learned changes
to their weights (per frame, from the distances, the noise level and how much the two
references differ; per pixel, from the last hidden state) plus the transformer's own output.
So carrying the references' content to the generated frames is there from the first step
instead of being learned through attention, and training learns what to change in the blend.
With ``reference_motion`` the two references are first warped (bilinear ``grid_sample``) along
a motion field the transformer predicts per token, zero at initialisation: what a blend of a
moving scene lacks is where things moved, and a warp expresses that with four numbers per
token where pixel corrections need every pixel. With ``reference_search`` a classical motion
search between the two references (``motion_search``, no parameters) offers a third candidate,
the motion-compensated blend, with a map of how clearly its motion beats none; the generator
learns how far to trust it (weights zero at initialisation). Measured in bench/quality.py
(issue 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from mardini.config import GeneratorConfig
from mardini.models.attention import MLP, Attention, RotaryEmbedding3D
from mardini.models.planner import TimestepEmbedding, patchify, unpatchify


def _modulate(x_BTND, shift_BTD, scale_BTD):
    return x_BTND * (1 + scale_BTD[:, :, None]) + shift_BTD[:, :, None]


def neighbour_references(
    x_BTCHW: torch.Tensor, frame_mask_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each frame's nearest reference frame at or before it and at or after it.

    Returns ``before``, ``after`` (``B T C H W``; zeros where there is none) and their distances
    ``B T`` in clip lengths (0 for a reference frame itself, 1 where there is none). Reads only
    reference frames, so it keeps Identity Attention's guarantee.
    """
    b, t = frame_mask_BT.shape
    index = torch.arange(t, device=frame_mask_BT.device).expand(b, t)
    far = 2 * t
    before = torch.where(frame_mask_BT, index, -far).cummax(dim=1).values
    after = torch.where(frame_mask_BT, index, far).flip(1).cummin(dim=1).values.flip(1)
    has_before, has_after = before >= 0, after < t

    def gather(pos_BT: torch.Tensor, ok_BT: torch.Tensor) -> torch.Tensor:
        idx = pos_BT.clamp(0, t - 1)[..., None, None, None].expand_as(x_BTCHW)
        return torch.where(ok_BT[..., None, None, None], x_BTCHW.gather(1, idx), 0.0)

    one = torch.ones((), dtype=x_BTCHW.dtype, device=x_BTCHW.device)
    dist_before = torch.where(has_before, (index - before).to(x_BTCHW.dtype) / t, one)
    dist_after = torch.where(has_after, (after - index).to(x_BTCHW.dtype) / t, one)
    return gather(before, has_before), gather(after, has_after), dist_before, dist_after


def blend_weights(d_before_BT: torch.Tensor, d_after_BT: torch.Tensor):
    """The weights of the linear-blend baseline: between two references, each weighted by the
    distance to the other; next to one reference only, a copy of it; with none, nothing."""
    has_before, has_after = d_before_BT < 1, d_after_BT < 1
    total = (d_before_BT + d_after_BT).clamp_min(1e-6)
    both = has_before & has_after
    on_ref = both & (d_before_BT + d_after_BT == 0)  # a reference frame: itself, once
    w_before = torch.where(both, d_after_BT / total, has_before.to(total))
    w_after = torch.where(both, d_before_BT / total, (has_after & ~has_before).to(total))
    half = torch.full_like(total, 0.5)
    return torch.where(on_ref, half, w_before), torch.where(on_ref, half, w_after)


# Soft-argmin temperature of ``motion_search`` in squared differences of [-1, 1] values, and
# the side of the window a motion is scored over (latent pixels); bench/motion_bound.py.
SEARCH_TEMPERATURE = 1e-3
SEARCH_WINDOW = 5


@torch.no_grad()
def motion_candidates(
    before_NCHW: torch.Tensor, after_NCHW: torch.Tensor, a_N: torch.Tensor, radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every linear motion's interpolation between two frames and how well it matches.

    For a frame a fraction ``a`` of the way from ``before`` to ``after`` and each motion ``v``
    in ``[-radius, radius]^2`` pixels across the gap: the candidate
    ``(1 - a) before(x - a v) + a after(x + (1 - a) v)`` (``K N C H W``, bilinear, edges
    repeated) and its cost, the mean squared difference of its two terms over a window
    (``K N 1 H W``). Candidate ``K // 2`` is no motion: the linear blend.
    """
    _, _, h, w = before_NCHW.shape
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=a_N.device, dtype=before_NCHW.dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=a_N.device, dtype=before_NCHW.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # H W 2, (x, y)
    unit = before_NCHW.new_tensor([2.0 / w, 2.0 / h])
    a_N1, a_N111 = a_N[:, None].to(before_NCHW), a_N[:, None, None, None].to(before_NCHW)

    def fetch(frames_NCHW, shift_N2):
        moved = grid + (shift_N2 * unit)[:, None, None, :]
        return F.grid_sample(
            frames_NCHW, moved, mode="bilinear", padding_mode="border", align_corners=False
        )

    frames, costs = [], []
    steps = range(-radius, radius + 1)
    for vx, vy in ((x, y) for y in steps for x in steps):
        v = before_NCHW.new_tensor([vx, vy])
        from_before = fetch(before_NCHW, -a_N1 * v)
        from_after = fetch(after_NCHW, (1 - a_N1) * v)
        frames.append((1 - a_N111) * from_before + a_N111 * from_after)
        diff = (from_before - from_after).pow(2).mean(1, keepdim=True)
        costs.append(
            F.avg_pool2d(diff, SEARCH_WINDOW, 1, SEARCH_WINDOW // 2, count_include_pad=False)
        )
    return torch.stack(frames), torch.stack(costs)


@torch.no_grad()
def motion_search(
    before_BTCHW: torch.Tensor,
    after_BTCHW: torch.Tensor,
    d_before_BT: torch.Tensor,
    d_after_BT: torch.Tensor,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilateral block matching between each frame's two references (``motion_candidates``).

    Returns the soft-argmin mix of the candidates ``B T C H W`` and ``B T 1 H W`` the log ratio
    of no motion's cost to the best one's (0 where nothing matches better than no motion).
    Frames without a reference on both sides get the blend (a copy of their one reference) and
    0. Reads only reference frames.
    """
    b = before_BTCHW.shape[0]
    both = (d_before_BT < 1) & (d_after_BT < 1)
    a_N = (d_before_BT / (d_before_BT + d_after_BT).clamp_min(1e-6)).where(both, 0.0).flatten()
    before, after = (rearrange(x, "b t c h w -> (b t) c h w") for x in (before_BTCHW, after_BTCHW))
    frames_KNCHW, cost_KN1HW = motion_candidates(before, after, a_N, radius)
    weights = torch.softmax(-cost_KN1HW / SEARCH_TEMPERATURE, dim=0)
    searched = (weights * frames_KNCHW).sum(0)
    still = len(cost_KN1HW) // 2  # v = (0, 0)
    clarity = (cost_KN1HW[still] + 1e-4).log() - (cost_KN1HW.min(0).values + 1e-4).log()
    searched = rearrange(searched, "(b t) c h w -> b t c h w", b=b)
    clarity = rearrange(clarity, "(b t) c h w -> b t c h w", b=b)
    blend_before, blend_after = (
        p[..., None, None, None] for p in blend_weights(d_before_BT, d_after_BT)
    )
    one_side = (~both)[..., None, None, None]
    searched = torch.where(
        one_side, blend_before * before_BTCHW + blend_after * after_BTCHW, searched
    )
    return searched, clarity.masked_fill(one_side, 0.0)


class ReferencePath(nn.Module):
    """A direct path from the reference frames to the generated frames' x0 prediction."""

    # Adam moves a weight by about the learning rate per step, and the mixing weights start at
    # zero and must reach about 1: at lr 1e-3 that takes ~1000 steps. Their outputs are scaled
    # by GAIN so a short run gets there (measured: bench/quality.py, issue 12).
    GAIN = 10.0

    # The motion field's unit: one output of ``motion`` moves a reference by this many pixels
    # (latent pixels) of the frame.
    MOTION_GAIN = 2.0

    def __init__(
        self, in_channels: int, patch: int, width: int, motion: bool = False, search: int = 0
    ):
        super().__init__()
        self.patch = patch
        self.search = search
        # Neighbouring references (2 C channels) and their two distance maps, per patch; with a
        # motion search also its candidate (C channels) and its clarity map.
        channels = 2 * in_channels + 2 + (in_channels + 1 if search else 0)
        self.embed = nn.Linear(patch * patch * channels, width)
        # Per frame: (distances, noise level, which sides exist, how much the two references
        # differ) -> weights of the reference before, the one after, and the noisy input (and
        # of the searched candidate's change to the blend).
        mixed = 4 if search else 3
        self.frame_mix = nn.Sequential(nn.Linear(6, 64), nn.SiLU(), nn.Linear(64, mixed))
        # Per pixel, from the last hidden state: corrections to the weights of both references
        # (and the searched candidate's).
        self.pixel_mix = nn.Linear(width, patch * patch * (3 if search else 2))
        # Per token, from the last hidden state: where to fetch each reference from (dx, dy for
        # the one before, dx, dy for the one after), upsampled bilinearly to every pixel.
        self.motion = nn.Linear(width, 4) if motion else None

    def zero_init(self) -> None:
        """The learned corrections start at zero: an untrained model's x0 prediction is the
        linear blend of the references (a copy of the one reference next to a frame that has
        only one, as in image-to-video), and training learns what to change in it."""
        for layer in (self.frame_mix[-1], self.pixel_mix, self.motion):
            if layer is None:
                continue
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def tokens(self, x_t_BTCHW: torch.Tensor, frame_mask_BT: torch.Tensor):
        """Token embeddings to add to the noisy frames' (``B L D``) and what ``mix`` needs."""
        b, t, _, h, w = x_t_BTCHW.shape
        before, after, d_before, d_after = neighbour_references(x_t_BTCHW, frame_mask_BT)
        dist = torch.stack([d_before, d_after], dim=2)[..., None, None].expand(b, t, 2, h, w)
        inputs = [before, after, dist]
        searched = None
        if self.search:
            searched, clarity = motion_search(before, after, d_before, d_after, self.search)
            inputs += [searched, clarity]
        tokens = self.embed(patchify(torch.cat(inputs, dim=2), self.patch))
        return tokens, (before, after, d_before, d_after, searched)

    def mix(self, x_t_BTCHW, t_BT, hidden_BTnD, refs) -> torch.Tensor:
        """The references' contribution to the x0 prediction, ``B T C H W``."""
        before, after, d_before, d_after, searched = refs
        b, t, _, h, w = x_t_BTCHW.shape
        both = (d_before < 1) & (d_after < 1)
        # log mean squared difference of the two references, ~[-2, 0]: 0 where there is one.
        differ = (before - after).pow(2).flatten(2).mean(2).add(1e-4).log() / 5
        features = torch.stack(
            [d_before, d_after, t_BT.to(d_before), d_before < 1, d_after < 1, both * differ],
            dim=-1,
        ).to(x_t_BTCHW.dtype)
        frame_w_BTk = (self.frame_mix(features) * self.GAIN)[..., None, None, None]
        pixel = rearrange(self.pixel_mix(hidden_BTnD) * self.GAIN, "b t n q -> b (t n) q")
        pixel_w_BTkHW = unpatchify(pixel, t, h, w, self.patch)
        prior_before, prior_after = (
            p[..., None, None, None] for p in blend_weights(d_before, d_after)
        )
        # The searched candidate's change to the plain blend, before any warp.
        change = (
            None if searched is None else searched - prior_before * before - prior_after * after
        )
        if self.motion is not None:
            before, after = self.warp(before, after, hidden_BTnD)
        w_before = prior_before + frame_w_BTk[:, :, 0] + pixel_w_BTkHW[:, :, :1]
        w_after = prior_after + frame_w_BTk[:, :, 1] + pixel_w_BTkHW[:, :, 1:2]
        out = w_before * before + w_after * after + frame_w_BTk[:, :, 2] * x_t_BTCHW
        if change is not None:
            out = out + (frame_w_BTk[:, :, 3] + pixel_w_BTkHW[:, :, 2:3]) * change
        return out

    def warp(self, before_BTCHW, after_BTCHW, hidden_BTnD):
        """Both references moved along the motion field predicted from ``hidden_BTnD``."""
        b, t, c, h, w = before_BTCHW.shape
        hp, wp = h // self.patch, w // self.patch
        flow = rearrange(self.motion(hidden_BTnD), "b t (y x) f -> (b t) f y x", y=hp, x=wp)
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        # Pixels -> grid_sample's [-1, 1] coordinates (x along the width, y along the height).
        scale = flow.new_tensor([2.0 / w, 2.0 / h, 2.0 / w, 2.0 / h])[None, :, None, None]
        flow = rearrange(flow * scale * self.MOTION_GAIN, "bt (s f) y x -> s bt y x f", s=2)
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=flow.device, dtype=flow.dtype)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=flow.device, dtype=flow.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # H W 2, (x, y)

        def move(frames_BTCHW, flow_btyx2):
            flat = rearrange(frames_BTCHW, "b t c h w -> (b t) c h w")
            moved = F.grid_sample(
                flat,
                grid + flow_btyx2,
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )
            return rearrange(moved, "(b t) c h w -> b t c h w", b=b)

        return move(before_BTCHW, flow[0]), move(after_BTCHW, flow[1])


class GeneratorBlock(nn.Module):
    """Spatial attn, temporal (or spatio-temporal) attn, cross-attn to planning, MLP."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        d = cfg.width
        self.norms = nn.ModuleList(
            nn.LayerNorm(d, elementwise_affine=False, eps=1e-6) for _ in range(4)
        )
        self.spatial = Attention(d, cfg.heads)
        self.temporal = Attention(d, cfg.heads)
        self.cross = Attention(d, cfg.heads, context_dim=d)
        self.mlp = MLP(d, cfg.mlp)
        # shift, scale, gate for each of the four sublayers, from the timestep embedding.
        self.ada = nn.Linear(d, 12 * d)
        # Extra shift, scale for the MLP input, from the frame's mean planning signal.
        self.plan_mod = nn.Linear(d, 2 * d)

    def forward(self, x_BLD, cond_BTD, plan_BTmD, angles, is_ref_BL, frames, temporal_grouping):
        mods = self.ada(F.silu(cond_BTD)).chunk(12, dim=-1)
        plan_shift, plan_scale = self.plan_mod(F.silu(plan_BTmD.mean(dim=2))).chunk(2, dim=-1)

        def sublayer(i, x, fn, extra_shift=0.0, extra_scale=0.0):
            shift, scale, gate = mods[3 * i : 3 * i + 3]
            h = rearrange(self.norms[i](x), "b (t n) d -> b t n d", t=frames)
            h = _modulate(h, shift + extra_shift, scale + extra_scale)
            out = rearrange(
                fn(rearrange(h, "b t n d -> b (t n) d")), "b (t n) d -> b t n d", t=frames
            )
            return x + rearrange(gate[:, :, None] * out, "b t n d -> b (t n) d")

        context = rearrange(plan_BTmD, "b t m d -> (b t) m d")
        x_BLD = sublayer(0, x_BLD, lambda h: self.spatial(h, frames, "spatial", angles))
        x_BLD = sublayer(
            1, x_BLD, lambda h: self.temporal(h, frames, temporal_grouping, angles, is_ref_BL)
        )
        x_BLD = sublayer(2, x_BLD, lambda h: self.cross(h, frames, "spatial", context_BMC=context))
        return sublayer(3, x_BLD, self.mlp, plan_shift, plan_scale)


class Generator(nn.Module):
    """Noisy high-res latents + per-frame times + planning signals -> velocity ``B T C H W``."""

    def __init__(
        self, cfg: GeneratorConfig, in_channels: int, plan_dim: int, checkpointing: bool = False
    ):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.checkpointing = checkpointing
        d, p = cfg.width, cfg.patch
        self.patch_embed = nn.Linear(p * p * in_channels, d)
        self.time = TimestepEmbedding(d)
        self.plan_proj = nn.Linear(plan_dim, d)
        self.null_plan = nn.Parameter(torch.zeros(plan_dim))
        self.plan_dim = plan_dim
        self.rope = RotaryEmbedding3D(d // cfg.heads)
        self.blocks = nn.ModuleList(GeneratorBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, p * p * in_channels)
        self.references = (
            ReferencePath(in_channels, p, d, cfg.reference_motion, cfg.reference_search)
            if cfg.reference_path
            else None
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; zero the modulation and output layers so every block starts as identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.time.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_plan, std=0.02)
        for block in self.blocks:
            for layer in (block.ada, block.plan_mod):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for layer in (self.final_ada, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.references is not None:
            self.references.zero_init()

    def null_planning(self, batch: int, frames: int) -> torch.Tensor:
        """The learned null planning signal as ``B T 1 E`` (one token per frame)."""
        return self.null_plan.expand(batch, frames, 1, self.plan_dim)

    def forward(
        self,
        x_t_BTCHW: torch.Tensor,
        t_BT: torch.Tensor,
        frame_mask_BT: torch.Tensor,
        plan_BTmE: torch.Tensor | None = None,
        attention: str | None = None,
    ) -> torch.Tensor:
        """Predict every frame (reference frames enter clean with t = 0): its velocity, or its
        clean content when the model predicts x0 (``MarDini`` converts).

        ``plan_BTmE`` None means null planning (the ``dm`` stages); ``attention`` overrides the
        config's ``temporal`` / ``spatiotemporal`` choice.
        """
        b, t, _, h, w = x_t_BTCHW.shape
        p = self.cfg.patch
        if h % p or w % p:
            raise ValueError(f"generator latents {h}x{w} are not divisible by its patch size {p}")
        n = (h // p) * (w // p)
        grouping = {"temporal": "temporal", "spatiotemporal": "full"}[
            attention or self.cfg.attention
        ]
        if plan_BTmE is None:
            plan_BTmE = self.null_planning(b, t)
        plan_BTmD = self.plan_proj(plan_BTmE)
        cond_BTD = self.time(t_BT)
        x_BLD = self.patch_embed(patchify(x_t_BTCHW, p))
        if self.references is not None:
            ref_tokens_BLD, refs = self.references.tokens(x_t_BTCHW, frame_mask_BT)
            x_BLD = x_BLD + ref_tokens_BLD
        is_ref_BL = frame_mask_BT.repeat_interleave(n, dim=1)
        angles = self.rope(t, h // p, w // p, device=x_BLD.device)
        for block in self.blocks:
            args = (x_BLD, cond_BTD, plan_BTmD, angles, is_ref_BL, t, grouping)
            if self.checkpointing and self.training:
                x_BLD = checkpoint(block, *args, use_reentrant=False)
            else:
                x_BLD = block(*args)
        shift, scale = self.final_ada(F.silu(cond_BTD)).chunk(2, dim=-1)
        x = _modulate(rearrange(self.final_norm(x_BLD), "b (t n) d -> b t n d", t=t), shift, scale)
        out = unpatchify(rearrange(self.final(x), "b t n q -> b (t n) q"), t, h, w, p)
        if self.references is not None:
            out = out + self.references.mix(x_t_BTCHW, t_BT, x, refs)
        return out
