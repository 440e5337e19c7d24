"""Attention building blocks shared by the planner and the generator.

Shapes: B batch, T frames, n tokens per frame, L = T*n tokens per clip, D width,
H heads, K head dim.

One ``Attention`` module serves three token groupings of the same ``B L D`` sequence:
``spatial`` (each frame alone), ``temporal`` (each spatial position across frames) and
``full`` (every token of every frame). RoPE is applied once in the clip layout, so the same
rotation gives each grouping its relative positions.

Identity Attention (MarDini): reference tokens attend only to reference tokens, masked
(noised) tokens attend to every token. It is an attention mask, built by ``identity_mask``;
a reference token's output therefore never depends on the masked frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RotaryEmbedding3D(nn.Module):
    """Axial rotary embedding over (time, row, column); the head dim is split between the axes."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        pairs = head_dim // 2
        t_pairs = pairs // 4  # time gets a quarter, rows and columns share the rest
        y_pairs = (pairs - t_pairs) // 2
        self.split = (t_pairs, y_pairs, pairs - t_pairs - y_pairs)
        self.theta = theta

    def forward(self, frames: int, rows: int, cols: int, device=None) -> torch.Tensor:
        """Angles ``L K/2`` for a T x rows x cols grid, in clip layout (t, y, x)."""
        grids = torch.meshgrid(
            torch.arange(frames, device=device, dtype=torch.float32),
            torch.arange(rows, device=device, dtype=torch.float32),
            torch.arange(cols, device=device, dtype=torch.float32),
            indexing="ij",
        )
        angles = []
        for pos, n in zip(grids, self.split, strict=True):
            if n == 0:
                continue
            freqs = self.theta ** (-torch.arange(n, device=device, dtype=torch.float32) / n)
            angles.append(pos.reshape(-1, 1) * freqs)
        return torch.cat(angles, dim=-1)


def apply_rope(x_BHLK: torch.Tensor, angles_LK2: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` by ``angles`` (computed in fp32, returned in x's dtype)."""
    x = x_BHLK.float().unflatten(-1, (-1, 2))
    cos, sin = angles_LK2.cos(), angles_LK2.sin()
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BHLK.dtype)


def identity_mask(is_ref_BL: torch.Tensor) -> torch.Tensor:
    """``B 1 L L`` bool, True where query may attend key: refs see refs, masked tokens see all."""
    q_ref = is_ref_BL[:, None, :, None]
    k_ref = is_ref_BL[:, None, None, :]
    return ~q_ref | k_ref


# grouping -> (split q/k/v, split the B L ref flags, merge the output back to B L D)
_GROUPS = {
    "spatial": ("b h (t n) k -> (b t) h n k", "b (t n) -> (b t) n", "(b t) h n k -> b (t n) (h k)"),
    "temporal": (
        "b h (t n) k -> (b n) h t k",
        "b (t n) -> (b n) t",
        "(b n) h t k -> b (t n) (h k)",
    ),
    "full": ("b h l k -> b h l k", "b l -> b l", "b h l k -> b l (h k)"),
}


class Attention(nn.Module):
    """Multi-head self- or cross-attention with QK RMS-normalisation and optional RoPE."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.cross = context_dim is not None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(
        self,
        x_BLD: torch.Tensor,
        frames: int = 1,
        grouping: str = "full",
        angles: torch.Tensor | None = None,
        is_ref_BL: torch.Tensor | None = None,
        context_BMC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend within ``grouping`` (``spatial`` | ``temporal`` | ``full``) of a B (T n) D clip.

        ``is_ref_BL`` turns on Identity Attention. For cross-attention, ``context_BMC`` holds
        the keys/values of each query group (its batch is the grouped batch, e.g. B*T).
        """
        q = rearrange(self.to_q(x_BLD), "b l (h k) -> b h l k", h=self.heads)
        if self.cross:
            k, v = rearrange(
                self.to_kv(context_BMC), "b m (two h k) -> two b h m k", two=2, h=self.heads
            )
        else:
            k, v = rearrange(self.to_kv(x_BLD), "b l (two h k) -> two b h l k", two=2, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None and not self.cross:
            q, k = apply_rope(q, angles), apply_rope(k, angles)

        # Regroup the clip into independent attention problems.
        if grouping not in _GROUPS:
            raise ValueError(f"unknown attention grouping {grouping!r}; use {sorted(_GROUPS)}")
        split, flags, merge = _GROUPS[grouping]
        sizes = {"t": frames} if grouping != "full" else {}
        q = rearrange(q, split, **sizes)
        if not self.cross:
            k, v = rearrange(k, split, **sizes), rearrange(v, split, **sizes)
        mask = None
        if is_ref_BL is not None and not self.cross:
            mask = identity_mask(rearrange(is_ref_BL, flags, **sizes))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(rearrange(out, merge, b=x_BLD.shape[0], **sizes))


class MLP(nn.Module):
    """Two-layer GELU MLP (the paper's parameter counts imply two matrices, not SwiGLU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
