"""MarDini: a MAR planner at low resolution conditions a DM generator at high resolution.

Shapes: B batch, T frames, 3 RGB, H W pixel height/width, C latent channels.

``forward(video, frame_mask, kind)`` computes the training loss of one stage kind:
- ``mar``: planner + pre-training head reconstruct the masked frames' low-res latents;
- ``dm``: the generator alone, with the learned null planning signal;
- ``joint``: planner and generator end to end; the generator's loss trains both (planning
  signals are replaced by the null with probability ``cfg_dropout``).
``sample(...)`` fills the masked frames; reference frames come back exactly as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from mardini.autoencoder import build_autoencoder, encode_pair
from mardini.config import TRAINED_PARTS, ModelConfig
from mardini.diffusion import build_schedule, masked_mse, sample_loop
from mardini.models.generator import Generator
from mardini.models.planner import DiffusionHead, Planner, ProjectionHead, patchify

# The kinds forward() trains through the diffusion models (``autoencoder`` trains itself).
KINDS = tuple(kind for kind in TRAINED_PARTS if kind != "autoencoder")


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise; drawn from ``generator`` (on its device) when one is given."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device).to(like)


def _rand(n: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(n, generator=generator, device=device).to(like.device)


class MarDini(nn.Module):
    """Planner + pre-training head + generator over a frozen per-frame autoencoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = build_autoencoder(cfg.autoencoder).requires_grad_(False).eval()
        c = self.autoencoder.channels
        ckpt = cfg.activation_checkpointing
        self.planner = Planner(cfg.planner, c, checkpointing=ckpt)
        patch_dim = cfg.planner.patch**2 * c
        if cfg.head.kind == "projection":
            self.planner_head: nn.Module = ProjectionHead(cfg.planner.width, patch_dim)
        else:
            self.planner_head = DiffusionHead(
                cfg.planner.width, patch_dim, cfg.head.width, cfg.head.depth
            )
        self.generator = Generator(cfg.generator, c, plan_dim=cfg.planner.width, checkpointing=ckpt)
        self.schedule = build_schedule(cfg.objective, cfg.time_shift)

    def train(self, mode: bool = True) -> MarDini:
        """Train mode for the models; the autoencoder stays frozen in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    # ------------------------------------------------------------------ latents

    @torch.no_grad()
    def encode(self, video_BT3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents for the generator (full resolution) and the planner (downscaled)."""
        self._check_size(video_BT3HW)
        return encode_pair(self.autoencoder, video_BT3HW, self.cfg.planner_downscale)

    def _check_size(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be B T 3 H W in [-1, 1], got shape {tuple(video.shape)}")
        h, w = video.shape[-2:]
        ae = self.autoencoder.downsample
        need_hi = ae * self.cfg.generator.patch
        need_lo = ae * self.cfg.planner.patch * self.cfg.planner_downscale
        need = math.lcm(need_hi, need_lo)
        if h % need or w % need:
            raise ValueError(
                f"frames of {h}x{w} px do not tile: height and width must be multiples of {need} "
                f"(autoencoder {ae}x, generator patch {self.cfg.generator.patch}, planner patch "
                f"{self.cfg.planner.patch}, planner downscale {self.cfg.planner_downscale})"
            )

    # ------------------------------------------------------------------ training

    def forward(
        self,
        video_BT3HW: torch.Tensor,
        frame_mask_BT: torch.Tensor,
        kind: str = "joint",
        generator: torch.Generator | None = None,
        t_B: torch.Tensor | None = None,
        attention: str | None = None,
        latents: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training loss of stage ``kind`` on a clip; ``t_B`` fixes the diffusion times (eval).

        ``generator`` makes noise, times and guidance dropout reproducible; ``latents`` (hi, lo)
        skips the autoencoder when they were computed before.
        """
        if kind == "autoencoder":
            if not hasattr(self.autoencoder, "loss"):
                raise ValueError("an autoencoder stage needs a trainable autoencoder (kind: kl)")
            return self.autoencoder.loss(video_BT3HW)
        if kind not in KINDS:
            raise ValueError(f"unknown stage kind {kind!r} for MarDini.forward; use one of {KINDS}")
        if frame_mask_BT.all(dim=1).any():
            raise ValueError("every sample needs at least one masked frame (frame_mask all True)")
        hi, lo = latents if latents is not None else self.encode(video_BT3HW)
        if kind == "mar":
            return self._planner_loss(lo, frame_mask_BT, generator, t_B)

        b = hi.shape[0]
        plan = None
        if kind == "joint":
            plan = self.planner(lo, frame_mask_BT)
            if self.training and self.cfg.cfg_dropout > 0:
                drop = _rand(b, hi, generator) < self.cfg.cfg_dropout
                null = self.generator.null_planning(b, plan.shape[1]).expand_as(plan)
                plan = torch.where(drop[:, None, None, None], null.to(plan.dtype), plan)
        t_B = self.schedule.sample_t(b, generator, hi.device) if t_B is None else t_B.to(hi.device)
        eps = _randn(hi.shape, hi, generator)
        t_BT = torch.where(frame_mask_BT, torch.zeros_like(t_B[:, None]), t_B[:, None])
        noise = eps
        if self.training and self.cfg.input_perturbation > 0:
            noise = eps + self.cfg.input_perturbation * _randn(hi.shape, hi, generator)
        x_t = torch.where(
            frame_mask_BT[..., None, None, None], hi, self.schedule.add_noise(hi, noise, t_BT)
        )
        v = self.velocity(x_t, t_BT, frame_mask_BT, plan, attention)
        if self.cfg.loss_space == "x0":
            pred, target = self.schedule.split(x_t, v, t_BT)[0], hi
        else:
            pred, target = v, self.schedule.target(hi, eps, t_BT)
        return {"loss": masked_mse(pred, target, frame_mask_BT, self.cfg.loss_reduction)}

    def velocity(self, x_t_BTCHW, t_BT, frame_mask_BT, plan=None, attention=None) -> torch.Tensor:
        """The generator's prediction as a velocity (converted when it predicts x0)."""
        out = self.generator(x_t_BTCHW, t_BT, frame_mask_BT, plan, attention)
        if self.cfg.prediction == "x0":
            return self.schedule.velocity_from_x0(x_t_BTCHW, out, t_BT)
        return out

    def _planner_loss(self, lo, frame_mask_BT, generator, t_B):
        plan_BTnD = self.planner(lo, frame_mask_BT)
        p = self.cfg.planner.patch
        target = rearrange(patchify(lo, p), "b (t n) q -> b t n q", t=lo.shape[1])
        if isinstance(self.planner_head, ProjectionHead):
            return {"loss": masked_mse(self.planner_head(plan_BTnD), target, frame_mask_BT)}
        # Diffusion head: every token of a sample shares its time, as in the generator.
        b = lo.shape[0]
        t_B = self.schedule.sample_t(b, generator, lo.device) if t_B is None else t_B.to(lo.device)
        t_Btn = t_B[:, None, None].expand(target.shape[:3])
        eps = _randn(target.shape, target, generator)
        x_t = self.schedule.add_noise(target, eps, t_Btn)
        v = self.planner_head(x_t, t_Btn, plan_BTnD)
        return {"loss": masked_mse(v, self.schedule.target(target, eps, t_Btn), frame_mask_BT)}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        video_BT3HW: torch.Tensor,
        frame_mask_BT: torch.Tensor,
        steps: int = 25,
        solver: str = "euler",
        cfg_scale: float = 1.0,
        kind: str = "joint",
        generator: torch.Generator | None = None,
        attention: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Generate the masked frames of ``video`` (their content is ignored); returns pixels.

        ``kind="dm"`` samples without the planner (null planning); ``cfg_scale`` > 1 mixes
        conditional and null-planning predictions (classifier-free guidance).
        """
        if kind not in ("dm", "joint"):
            raise ValueError(
                f"sample() needs a generator: kind must be 'dm' or 'joint', got {kind!r}"
            )
        # Masked frames are zeroed so nothing of them can leak into the sample.
        keep = frame_mask_BT[..., None, None, None]
        video = torch.where(keep, video_BT3HW, torch.zeros_like(video_BT3HW))
        hi, lo = self.encode(video)
        plan = self.planner(lo, frame_mask_BT) if kind == "joint" else None
        guided = plan is not None and cfg_scale != 1.0

        def velocity(x_t, t_BT):
            if not guided:
                return self.velocity(x_t, t_BT, frame_mask_BT, plan, attention)
            null = self.generator.null_planning(*plan.shape[:2]).expand_as(plan).to(plan.dtype)
            v = self.velocity(
                torch.cat([x_t, x_t]),
                torch.cat([t_BT, t_BT]),
                torch.cat([frame_mask_BT] * 2),
                torch.cat([plan, null]),
                attention,
            )
            v_cond, v_null = v.chunk(2)
            return v_null + cfg_scale * (v_cond - v_null)

        noise = _randn(hi.shape, hi, generator)
        latents = sample_loop(
            velocity, self.schedule, hi, frame_mask_BT, noise, steps, solver, progress
        )
        out = self.autoencoder.decode(latents).clamp(-1, 1)
        return torch.where(keep, video_BT3HW, out)

    @torch.no_grad()
    def predict_x0(
        self,
        video_BT3HW: torch.Tensor,
        frame_mask_BT: torch.Tensor,
        kind: str = "joint",
        generator: torch.Generator | None = None,
        attention: str | None = None,
    ) -> torch.Tensor:
        """One model call from pure noise (t = 1): the model's estimate of the masked frames'
        expected content (what sampling starts from); reference frames come back as given."""
        keep = frame_mask_BT[..., None, None, None]
        video = torch.where(keep, video_BT3HW, torch.zeros_like(video_BT3HW))
        hi, lo = self.encode(video)
        plan = self.planner(lo, frame_mask_BT) if kind == "joint" else None
        t_BT = (~frame_mask_BT).to(hi.dtype)
        x_t = torch.where(keep, hi, _randn(hi.shape, hi, generator))
        v = self.velocity(x_t, t_BT, frame_mask_BT, plan, attention)
        out = self.autoencoder.decode(self.schedule.split(x_t, v, t_BT)[0]).clamp(-1, 1)
        return torch.where(keep, video_BT3HW, out)

    # ------------------------------------------------------------------ bookkeeping

    def num_params(self) -> dict[str, int]:
        """Parameter counts per part (the autoencoder is frozen and counted apart)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "planner": count(self.planner),
            "planner_head": count(self.planner_head),
            "generator": count(self.generator),
            "autoencoder": count(self.autoencoder),
        }
