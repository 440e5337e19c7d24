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
        """Predict the velocity of every frame (reference frames enter clean with t = 0).

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
        return unpatchify(rearrange(self.final(x), "b t n q -> b (t n) q"), t, h, w, p)
