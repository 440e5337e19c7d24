"""Analytic FLOPs of MarDini's planner and generator, for MFU and the benchmarks.

Shapes: B batch, T frames, n planner tokens per frame, N generator tokens per frame, m planning
tokens per frame the generator reads (n with a planner, 1 for the null signal), D width,
M MLP width, P patch dim (patch^2 x latent channels).

Counted, at 2 FLOPs per multiply-add: every ``nn.Linear`` of the planner, its pre-training
head and the generator (patch embeddings, q/kv/out projections, MLPs, adaptive modulation,
timestep and planning projections, heads, output layers) and the attention score
(``Q K^T``) and value (``P V``) matmuls of every self- and cross-attention. Attention is
counted dense, as SDPA computes it under Identity Attention's mask; the ``flex`` backend skips
tiles where reference queries meet only masked keys, so it does a little less work than
counted. Not counted: norms, RoPE, softmax, activations, modulation arithmetic and patchify
(elementwise, O(L D), under 1 % at paper sizes), the frozen autoencoder (latents are an input
here, as with a latent cache), and the re-run forward of activation checkpointing: these are
*model* FLOPs, the MFU convention of PaLM, so MFU does not reward recomputation.

Training = forward + backward, with backward = 2 x forward (gradients of activations and of
weights) for every part a stage kind trains; every part a kind runs is trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mardini.config import TRAINED_PARTS, ModelConfig

# Parts each stage kind runs (and trains), as in MarDini.forward and the trainer; the
# autoencoder stage's FLOPs are not counted.
KIND_PARTS = {kind: parts for kind, parts in TRAINED_PARTS.items() if kind != "autoencoder"}
_TIME_FREQ = 256  # TimestepEmbedding's sinusoidal features

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the CUDA device name;
# the first match wins, so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def _linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def _attention(groups: int, q_len: int, k_len: int, width: int) -> int:
    # Q K^T and P V over all heads: 2 matmuls of q_len x k_len x width multiply-adds each.
    return 4 * groups * q_len * k_len * width


def latent_grid(cfg: ModelConfig) -> tuple[int, int]:
    """(latent channels, spatial downsampling) of the configured autoencoder."""
    ae = cfg.autoencoder
    if ae.kind == "pixel":
        return 3, 1
    return ae.latent_channels, 2 ** (len(ae.block_out_channels) - 1)


def tokens_per_frame(cfg: ModelConfig, resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(planner tokens n, generator tokens N) per frame for frames of ``resolution`` pixels."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    _, f = latent_grid(cfg)
    pg, pp, ds = cfg.generator.patch, cfg.planner.patch, cfg.planner_downscale
    hi = (h // f // pg) * (w // f // pg)
    lo = (h // ds // f // pp) * (w // ds // f // pp)
    return lo, hi


def planner_flops(cfg: ModelConfig, frames: int, n: int, batch: int = 1) -> int:
    """Forward FLOPs of the planner on ``batch`` clips of ``frames`` x ``n`` tokens."""
    p = cfg.planner
    c, _ = latent_grid(cfg)
    rows = batch * frames * n
    d = p.width
    block = (
        2 * (_linear(rows, d, d) + _linear(rows, d, 2 * d) + _linear(rows, d, d))  # 2 attn
        + _attention(batch * frames, n, n, d)  # spatial: each frame alone
        + _attention(batch, frames * n, frames * n, d)  # spatio-temporal: the whole clip
        + _linear(rows, d, p.mlp)
        + _linear(rows, p.mlp, d)
    )
    return _linear(rows, p.patch**2 * c, d) + p.depth * block


def head_flops(cfg: ModelConfig, frames: int, n: int, batch: int = 1) -> int:
    """Forward FLOPs of the planner's pre-training head (projection or MLP diffusion head)."""
    c, _ = latent_grid(cfg)
    rows, d, q = batch * frames * n, cfg.planner.width, cfg.planner.patch**2 * c
    if cfg.head.kind == "projection":
        return _linear(rows, d, q)
    h = cfg.head.width
    return (
        _linear(rows, _TIME_FREQ, h)  # timestep MLP, per token (times are per token)
        + _linear(rows, h, h)
        + _linear(rows, d, h)  # planning token -> condition
        + _linear(rows, q, h)  # noisy patch in
        + cfg.head.depth * (_linear(rows, h, 3 * h) + 2 * _linear(rows, h, h))
        + _linear(rows, h, 2 * h)
        + _linear(rows, h, q)
    )


def generator_flops(
    cfg: ModelConfig,
    frames: int,
    big_n: int,
    plan_tokens: int,
    batch: int = 1,
    attention: str | None = None,
) -> int:
    """Forward FLOPs of the generator on ``frames`` x ``big_n`` tokens reading ``plan_tokens``
    planning tokens per frame; ``attention`` overrides the config's temporal/spatiotemporal."""
    g = cfg.generator
    c, _ = latent_grid(cfg)
    d, e, m = g.width, cfg.planner.width, plan_tokens
    bt = batch * frames
    rows = bt * big_n
    kind = attention or g.attention
    if kind == "temporal":
        second = _attention(batch * big_n, frames, frames, d)
    elif kind == "spatiotemporal":
        second = _attention(batch, frames * big_n, frames * big_n, d)
    else:
        raise ValueError(f"unknown generator attention {kind!r}; use temporal or spatiotemporal")
    self_attn = _linear(rows, d, d) + _linear(rows, d, 2 * d) + _linear(rows, d, d)
    block = (
        _linear(bt, d, 12 * d)  # adaptive shift/scale/gate, per frame
        + _linear(bt, d, 2 * d)  # planning modulation of the MLP, per frame
        + 2 * self_attn
        + _attention(bt, big_n, big_n, d)  # spatial
        + second
        + _linear(rows, d, d)  # cross-attention: q from tokens,
        + _linear(bt * m, d, 2 * d)  # k/v from the frame's planning tokens,
        + _linear(rows, d, d)  # out
        + _attention(bt, big_n, m, d)
        + _linear(rows, d, g.mlp)
        + _linear(rows, g.mlp, d)
    )
    references = 0
    if g.reference_path:
        # ReferencePath: embedding, per-frame mix MLP (6 -> 64 -> 3), per-pixel mix; a motion
        # search adds a candidate (C + 1 input channels, one more weight of each mix) and its
        # own cost (grid samples and pooling, not matrix products: not counted).
        search = 1 if g.reference_search else 0
        references = (
            _linear(rows, g.patch**2 * (2 * c + 2 + search * (c + 1)), d)
            + _linear(bt, 6, 64)
            + _linear(bt, 64, 3 + search)
            + _linear(rows, d, g.patch**2 * (2 + search))
        )
    return (
        references
        + _linear(rows, g.patch**2 * c, d)
        + _linear(bt, _TIME_FREQ, d)
        + _linear(bt, d, d)
        + _linear(bt * m, e, d)  # planning signals -> generator width
        + g.depth * block
        + _linear(bt, d, 2 * d)
        + _linear(rows, d, g.patch**2 * c)
    )


def _config(cfg: ModelConfig | str) -> ModelConfig:
    return ModelConfig(preset=cfg) if isinstance(cfg, str) else cfg


def forward_flops(
    cfg: ModelConfig | str,
    kind: str,
    frames: int,
    resolution: int | tuple[int, int],
    batch: int = 1,
    attention: str | None = None,
) -> dict[str, int]:
    """Forward FLOPs per part (``planner``, ``planner_head``, ``generator``) of a ``kind`` step."""
    cfg = _config(cfg)
    if kind not in KIND_PARTS:
        raise ValueError(f"unknown stage kind {kind!r}; use one of {sorted(KIND_PARTS)}")
    n, big_n = tokens_per_frame(cfg, resolution)
    out = {}
    if "planner" in KIND_PARTS[kind]:
        out["planner"] = planner_flops(cfg, frames, n, batch)
    if "planner_head" in KIND_PARTS[kind]:
        out["planner_head"] = head_flops(cfg, frames, n, batch)
    if "generator" in KIND_PARTS[kind]:
        plan = n if kind == "joint" else 1  # dm stages read the one-token null signal
        out["generator"] = generator_flops(cfg, frames, big_n, plan, batch, attention)
    return out


def train_flops(
    cfg: ModelConfig | str,
    kind: str,
    frames: int,
    resolution: int | tuple[int, int],
    batch: int = 1,
    attention: str | None = None,
) -> int:
    """Model FLOPs of one training step of ``kind`` on ``batch`` clips: 3 x forward."""
    return 3 * sum(forward_flops(cfg, kind, frames, resolution, batch, attention).values())


def sample_flops(
    cfg: ModelConfig | str,
    frames: int,
    resolution: int | tuple[int, int],
    steps: int,
    batch: int = 1,
    kind: str = "joint",
    cfg_scale: float = 1.0,
    solver: str = "euler",
    attention: str | None = None,
) -> int:
    """FLOPs of ``MarDini.sample``: the planner once, the generator per solver call.

    Guidance (``cfg_scale`` != 1 with a planner) doubles the generator's batch; Heun calls it
    twice per step except the last.
    """
    cfg = _config(cfg)
    n, big_n = tokens_per_frame(cfg, resolution)
    calls = steps if solver == "euler" else 2 * steps - 1
    planner = planner_flops(cfg, frames, n, batch) if kind == "joint" else 0
    guided = kind == "joint" and cfg_scale != 1.0
    gen_batch = 2 * batch if guided else batch
    plan = n if kind == "joint" else 1
    return planner + calls * generator_flops(cfg, frames, big_n, plan, gen_batch, attention)


def peak_tflops(device: torch.device | str | None = None, dtype: str = "bf16") -> float | None:
    """Dense bf16 peak TFLOP/s of a CUDA device by its name; None on CPU or an unknown GPU."""
    if dtype != "bf16":
        raise ValueError(f"only bf16 peaks are tabulated, got {dtype!r}")
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def mfu(
    flops: float,
    seconds: float,
    device: torch.device | str | None = None,
    world_size: int = 1,
    peak: float | None = None,
) -> float | None:
    """Model FLOPs utilisation: ``flops`` done in ``seconds`` by ``world_size`` devices over
    their peak (``peak`` TFLOP/s per device, else looked up); None where no peak is known."""
    peak = peak if peak is not None else peak_tflops(device)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (world_size * peak * 1e12)


def total(parts: Mapping[str, int]) -> int:
    """Sum of a per-part FLOP count."""
    return sum(parts.values())
