"""Shards of precomputed autoencoder latents: where they live and how a sample reads back.

Written by ``mardini prep latents`` (``mardini.data.latent_cache``) beside the mp4 shards::

    {shards}/latents/{resolution}px-{fingerprint[:12]}/latents.json        written last
    {shards}/latents/{resolution}px-{fingerprint[:12]}/{split}/shard-*.tar  one per mp4 shard

One sample per clip, same ``__key__`` as its mp4 sample: ``hi.npy`` (``T C h w``, the
generator's latents at ``resolution`` px), ``lo.npy`` (``T C h' w'``, the planner's latents of
the frames downscaled by ``planner_downscale``) and ``json`` (the mp4 sample's metadata plus a
``latents`` record). Every frame of the clip is kept at the clip's own fps, so the loader cuts
windows exactly as it does from mp4 (same stride, same seeded start): per-frame latents make a
window of latents the latents of the window. The fingerprint (``mardini.autoencoder.
fingerprint``) covers the autoencoder's weights and the downscale: a cache is only ever read
by a model that would compute the same latents.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from mardini.data.clips import ClipSpec, RawSample, clip_info, frame_stride, window_starts
from mardini.storage import join

LATENTS_DIR = "latents"
CACHE_RECORD = "latents.json"
HI, LO = "hi.npy", "lo.npy"
DTYPES = ("float32", "float16")


def cache_url(shards: str, resolution: int, fingerprint: str) -> str:
    """The cache of one (autoencoder, downscale, resolution) under a dataset's shard root."""
    return join(shards, LATENTS_DIR, f"{resolution}px-{fingerprint[:12]}")


def to_npy(tensor: torch.Tensor, dtype: str) -> bytes:
    """``.npy`` bytes of a tensor stored as ``dtype`` (float32: exact; float16: half the bytes)."""
    if dtype not in DTYPES:
        raise ValueError(f"latent dtype {dtype!r}: use one of {DTYPES}")
    buffer = io.BytesIO()
    np.save(buffer, tensor.detach().cpu().float().numpy().astype(dtype), allow_pickle=False)
    return buffer.getvalue()


def from_npy(data: bytes) -> torch.Tensor:
    """A float32 tensor from ``.npy`` bytes."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def is_latent_sample(sample: RawSample) -> bool:
    """True for a latent-cache sample (``hi.npy``), False for an mp4 sample."""
    return HI in sample


def decode_latents(
    sample: RawSample, spec: ClipSpec, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of ``spec`` from clip frame ``start``: ``(hi T C h w, lo T C h' w')``."""
    info = clip_info(sample)
    meta = json.loads(sample["json"]).get("latents", {})
    if meta.get("resolution") != spec.resolution:
        raise ValueError(
            f"{info.where}: latents were cached at {meta.get('resolution')} px, the stage wants "
            f"{spec.resolution} px; run `mardini prep latents` for this stage"
        )
    stride = frame_stride(info, spec)
    if not 0 <= start < window_starts(info, spec):
        raise ValueError(f"{info.where}: window start {start} does not fit {spec}")
    window = slice(start, start + (spec.frames - 1) * stride + 1, stride)
    hi, lo = from_npy(sample[HI]), from_npy(sample[LO])
    if hi.shape[0] != info.frames or lo.shape[0] != info.frames:
        raise ValueError(
            f"{info.where}: latents hold {hi.shape[0]}/{lo.shape[0]} frames, json says "
            f"{info.frames}; re-run `mardini prep latents`"
        )
    return hi[window], lo[window]
