"""MAR planner: a Llama-style bidirectional transformer over low-resolution latent frames.

Shapes: B batch, T frames, C latent channels, h w low-res latent height/width,
p patch, n = (h/p)(w/p) tokens per frame, L = T*n, D planner width.

Each block: pre-RMSNorm spatial attention (each frame alone), pre-RMSNorm spatio-temporal
attention (every token of every frame, Identity Attention: reference tokens see only
reference tokens), pre-RMSNorm MLP. A masked frame's patch embeddings are replaced by a learned
``[MASK]`` embedding. The final normed hidden states, per frame, are the planning signals.

Two attention sublayers per block is what the paper's counts imply: MAR-L (depth 16, width
4096, MLP 8192) = 16 x (2 x 4D^2 + 2 D x 8192) = 3.2B; MAR-S = 1.3B.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from mardini.config import PlannerConfig
from mardini.models.attention import MLP, Attention, RotaryEmbedding3D


def patchify(x_BTCHW: torch.Tensor, p: int) -> torch.Tensor:
    """B T C H W -> B (T h w) (p p C) with h = H/p, w = W/p."""
    return rearrange(x_BTCHW, "b t c (h p) (w q) -> b (t h w) (p q c)", p=p, q=p)


def unpatchify(x_BLP: torch.Tensor, frames: int, height: int, width: int, p: int) -> torch.Tensor:
    """Inverse of ``patchify`` for latents of ``height`` x ``width``."""
    return rearrange(
        x_BLP,
        "b (t h w) (p q c) -> b t c (h p) (w q)",
        t=frames,
        h=height // p,
        w=width // p,
        p=p,
        q=p,
    )


class PlannerBlock(nn.Module):
    """Spatial attention, spatio-temporal attention with Identity Attention, MLP."""

    def __init__(self, cfg: PlannerConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.width)
        self.spatial = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.RMSNorm(cfg.width)
        self.spatiotemporal = Attention(cfg.width, cfg.heads)
        self.norm3 = nn.RMSNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.mlp)

    def forward(self, x_BLD, frames, angles, is_ref_BL):
        x_BLD = x_BLD + self.spatial(self.norm1(x_BLD), frames, "spatial", angles)
        x_BLD = x_BLD + self.spatiotemporal(self.norm2(x_BLD), frames, "full", angles, is_ref_BL)
        return x_BLD + self.mlp(self.norm3(x_BLD))


class Planner(nn.Module):
    """Low-res latents + frame mask -> planning signals ``B T n D``."""

    def __init__(self, cfg: PlannerConfig, in_channels: int, checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.checkpointing = checkpointing
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch * in_channels, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))
        self.rope = RotaryEmbedding3D(cfg.width // cfg.heads)
        self.blocks = nn.ModuleList(PlannerBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.width)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, zero biases, small-normal [MASK] embedding."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latents_BTChw: torch.Tensor, frame_mask_BT: torch.Tensor) -> torch.Tensor:
        """Return planning signals ``B T n D`` (masked frames' latents are never read)."""
        b, t, _, h, w = latents_BTChw.shape
        p = self.cfg.patch
        if h % p or w % p:
            raise ValueError(f"planner latents {h}x{w} are not divisible by its patch size {p}")
        n = (h // p) * (w // p)
        x_BLD = self.patch_embed(patchify(latents_BTChw, p))
        is_ref_BL = frame_mask_BT.repeat_interleave(n, dim=1)
        x_BLD = torch.where(is_ref_BL[..., None], x_BLD, self.mask_token.to(x_BLD.dtype))
        angles = self.rope(t, h // p, w // p, device=x_BLD.device)
        for block in self.blocks:
            if self.checkpointing and self.training:
                x_BLD = checkpoint(block, x_BLD, t, angles, is_ref_BL, use_reentrant=False)
            else:
                x_BLD = block(x_BLD, t, angles, is_ref_BL)
        return rearrange(self.norm(x_BLD), "b (t n) d -> b t n d", t=t)


class ProjectionHead(nn.Module):
    """The paper's pre-training head: planning tokens -> low-res latent patches (masked L2)."""

    def __init__(self, width: int, patch_dim: int):
        super().__init__()
        self.proj = nn.Linear(width, patch_dim)
        nn.init.zeros_(self.proj.bias)
        nn.init.xavier_uniform_(self.proj.weight)

    def forward(self, plan_BTnD: torch.Tensor) -> torch.Tensor:
        return self.proj(plan_BTnD)


class DiffusionHead(nn.Module):
    """MAR-style MLP denoiser per token: (noisy patch, time, planning token) -> velocity."""

    def __init__(self, width: int, patch_dim: int, hidden: int, depth: int):
        super().__init__()
        self.time = TimestepEmbedding(hidden)
        self.cond = nn.Linear(width, hidden)
        self.inp = nn.Linear(patch_dim, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out_mod = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, patch_dim)
        for m in (self.out, self.out_mod):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """``x_t``: ... P noisy patches, ``t``: ... times, ``plan``: ... D planning tokens."""
        c = self.time(t) + self.cond(plan)
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_mod(nn.functional.silu(c)).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift)


class _ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mod = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h, c):
        shift, scale, gate = self.mod(nn.functional.silu(c)).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled by 1000) followed by a two-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -torch.arange(half, device=t.device, dtype=torch.float32) * (9.21034 / half)
        )
        args = t.float()[..., None] * 1000.0 * freqs  # 9.21034 = ln(10000)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
