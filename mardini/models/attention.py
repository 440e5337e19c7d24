"""Attention building blocks shared by the planner and the generator.

Shapes: B batch, T frames, n tokens per frame, L = T*n tokens per clip, D width,
H heads, K head dim; G independent attention groups of S tokens each (after regrouping).

One ``Attention`` module serves three token groupings of the same ``B L D`` sequence:
``spatial`` (each frame alone), ``temporal`` (each spatial position across frames) and
``full`` (every token of every frame). RoPE is applied once in the clip layout, so the same
rotation gives each grouping its relative positions.

Identity Attention (MarDini): reference tokens attend only to reference tokens, masked
(noised) tokens attend to every token. It is an attention mask, built by ``identity_mask``;
a reference token's output therefore never depends on the masked frames.

Kernels (``Attention.backend``; ``set_attention_backend(model, name)`` sets every module):
- ``sdpa`` (default): ``F.scaled_dot_product_attention``. Without Identity Attention, or where
  it masks nothing (every group all-reference or all-masked), no mask is passed, so the fused
  flash kernels run; otherwise a dense ``G 1 S S`` bool mask.
- ``flex``: ``flex_attention`` with a ``BlockMask`` (``identity_block_mask``) built from
  per-tile counts of the reference flags: no dense ``S x S`` tensor (17 frames at 512 px are
  17k generator tokens: a 300 MB mask per clip and layer), and tiles where reference queries
  meet only masked keys are skipped. Groups shorter than one tile (``temporal``: T tokens)
  keep the tiny dense mask. On CUDA the flex kernel is compiled (eager flex is an unfused
  reference implementation that materialises the scores); on CPU it runs eagerly, or fused
  inside ``torch.compile``, and forward only: torch 2.13 has no CPU flex backward, so CPU
  training falls back to SDPA with the dense mask (logged once).
``compile_blocks(model)`` compiles every transformer block in place. Both paths accept bf16
autocast: q, k and v are brought to one dtype before the kernel.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BACKENDS = ("sdpa", "flex")
log = logging.getLogger(__name__)


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
    x = x_BHLK.float()
    # Pair (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), written as x cos + (-x1, x0) sin so
    # the result is one L x K elementwise op (no stacked pairs: a 5-D buffer that inductor's CPU
    # flex lowering cannot take), with the same rounding.
    cos = angles_LK2.cos().repeat_interleave(2, dim=-1)
    sin = angles_LK2.sin().repeat_interleave(2, dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.cat((-pairs[..., 1:], pairs[..., :1]), dim=-1).flatten(-2)
    return (x * cos + swapped * sin).to(x_BHLK.dtype)


def identity_mask(is_ref_BL: torch.Tensor) -> torch.Tensor:
    """``B 1 L L`` bool, True where query may attend key: refs see refs, masked tokens see all."""
    q_ref = is_ref_BL[:, None, :, None]
    k_ref = is_ref_BL[:, None, None, :]
    return ~q_ref | k_ref


def _ordered(blocks_GHQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile: how many key tiles are set, and their indices first (BlockMask layout)."""
    dense = blocks_GHQK.to(torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1).to(torch.int32), indices.to(torch.int32)


def identity_block_mask(is_ref_GS: torch.Tensor, block_size: int = 128) -> BlockMask:
    """Identity Attention over G groups of S tokens as a flex ``BlockMask``, without an S x S mask.

    A tile of ``block_size`` queries x ``block_size`` keys allows ``masked_q * keys + ref_q *
    ref_keys`` pairs: all of them makes it a full tile (no mask_mod evaluated), none an empty
    one (skipped), anything else a partial tile. Padding past S counts as not allowed, as in
    ``create_block_mask``, so the result is the same BlockMask at O(G (S/block)^2) cost.
    """
    g, s = is_ref_GS.shape
    pad = -s % block_size
    ref_GS = is_ref_GS.to(torch.int32)
    ref_GNb = F.pad(ref_GS, (0, pad)).view(g, -1, block_size)
    valid_GNb = F.pad(torch.ones_like(ref_GS), (0, pad)).view(g, -1, block_size)
    n_valid_GN, n_ref_GN = valid_GNb.sum(-1), ref_GNb.sum(-1)
    n_masked_GN = n_valid_GN - n_ref_GN
    allowed_GQK = (
        n_masked_GN[:, :, None] * n_valid_GN[:, None, :]
        + n_ref_GN[:, :, None] * n_ref_GN[:, None, :]
    )
    full_GQK = allowed_GQK == block_size * block_size
    partial_GQK = (allowed_GQK > 0) & ~full_GQK

    def mask_mod(b, h, q_idx, kv_idx):
        return ~is_ref_GS[b, q_idx] | is_ref_GS[b, kv_idx]

    kv_num, kv_indices = _ordered(partial_GQK[:, None])
    full_num, full_indices = _ordered(full_GQK[:, None])
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(s, s),
    )


@functools.cache
def _compiled_flex():
    # One compiled flex kernel per process: eager flex_attention is an unfused reference path.
    return torch.compile(flex_attention)


def flex_identity_attention(
    q_GHSK: torch.Tensor,
    k_GHSK: torch.Tensor,
    v_GHSK: torch.Tensor,
    is_ref_GS: torch.Tensor,
    block_size: int = 128,
) -> torch.Tensor:
    """Identity Attention with ``flex_attention``; equals SDPA with ``identity_mask``."""
    block_mask = identity_block_mask(is_ref_GS, block_size)
    on_cuda = q_GHSK.device.type == "cuda" and not torch.compiler.is_compiling()
    kernel = _compiled_flex() if on_cuda else flex_attention
    if q_GHSK.device.type == "cpu":
        # Fresh copies: inductor's CPU flex kernel (torch 2.13) returns wrong values for the
        # permuted views that regrouping makes inside a compiled graph. O(G S K), CPU only,
        # where flex is a test and inference path. (That kernel also needs tiles >= 16.)
        q_GHSK, k_GHSK, v_GHSK = (
            t.clone(memory_format=torch.contiguous_format) for t in (q_GHSK, k_GHSK, v_GHSK)
        )
    return kernel(q_GHSK, k_GHSK, v_GHSK, block_mask=block_mask)


def _flex_supports(*qkv: torch.Tensor) -> bool:
    """Whether flex can run here: torch 2.13 has no flex backward on CPU (eager or compiled),
    so CPU training falls back to the dense-mask SDPA, which computes the same attention."""
    if qkv[0].device.type != "cpu":
        return True
    if torch.is_grad_enabled() and any(t.requires_grad for t in qkv):
        _log_cpu_flex_fallback()
        return False
    return True


@functools.cache
def _log_cpu_flex_fallback() -> None:
    log.warning(
        "attention backend 'flex' has no backward on CPU in torch %s; Identity Attention uses "
        "SDPA with a dense mask while gradients are needed (flex still runs under no_grad)",
        torch.__version__,
    )


def _masks_anything(is_ref_GS: torch.Tensor) -> bool:
    """Whether Identity Attention changes anything: some group mixes reference and masked tokens."""
    if torch.compiler.is_compiling():
        return True  # a data-dependent branch would break the graph; the mask is always right
    return bool((is_ref_GS.any(dim=-1) & ~is_ref_GS.all(dim=-1)).any())


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

    # Tile size of the flex BlockMask; groups shorter than this use SDPA's dense mask.
    flex_block_size: int = 128

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None = None,
        qk_norm: bool = True,
        backend: str = "sdpa",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
        self.backend = backend
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
        # Under autocast the norms may keep fp32 while v is bf16; the kernels need one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)

        # Regroup the clip into independent attention problems.
        if grouping not in _GROUPS:
            raise ValueError(f"unknown attention grouping {grouping!r}; use {sorted(_GROUPS)}")
        split, flags, merge = _GROUPS[grouping]
        sizes = {"t": frames} if grouping != "full" else {}
        q = rearrange(q, split, **sizes)
        if not self.cross:
            k, v = rearrange(k, split, **sizes), rearrange(v, split, **sizes)
        is_ref_GS = None
        if is_ref_BL is not None and not self.cross:
            is_ref_GS = rearrange(is_ref_BL, flags, **sizes)
        out = self._attend(q, k, v, is_ref_GS)
        return self.to_out(rearrange(out, merge, b=x_BLD.shape[0], **sizes))

    def _attend(self, q_GHSK, k_GHSK, v_GHSK, is_ref_GS):
        """The attention kernel for this backend; Identity Attention when ``is_ref_GS`` is given."""
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.backend!r}; use one of {BACKENDS}")
        if is_ref_GS is None or not _masks_anything(is_ref_GS):
            return F.scaled_dot_product_attention(q_GHSK, k_GHSK, v_GHSK)
        if self.backend == "flex" and q_GHSK.shape[-2] >= self.flex_block_size:
            if _flex_supports(q_GHSK, k_GHSK, v_GHSK):
                return flex_identity_attention(
                    q_GHSK, k_GHSK, v_GHSK, is_ref_GS, self.flex_block_size
                )
        mask = identity_mask(is_ref_GS)
        return F.scaled_dot_product_attention(q_GHSK, k_GHSK, v_GHSK, attn_mask=mask)


def set_attention_backend(
    model: nn.Module, backend: str, flex_block_size: int | None = None
) -> int:
    """Use ``backend`` (``sdpa`` | ``flex``) in every ``Attention`` of ``model``; returns how many.

    ``flex_block_size`` changes the BlockMask tile (128 suits GPUs; tests use small tiles).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for m in modules:
        m.backend = backend
        if flex_block_size is not None:
            m.flex_block_size = flex_block_size
    return len(modules)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every transformer block (entries of ``blocks`` lists) in place.

    Per block rather than the whole model: graphs stay small, the state_dict keys do not
    change, and activation checkpointing (which calls each block) keeps working. Returns how
    many blocks were compiled; ``compile_kwargs`` go to ``nn.Module.compile``.
    """
    count = 0
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                block.compile(**compile_kwargs)
                count += 1
    return count


class MLP(nn.Module):
    """Two-layer GELU MLP (the paper's parameter counts imply two matrices, not SwiGLU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
