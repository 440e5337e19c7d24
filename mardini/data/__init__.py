"""Streaming data: WebDataset shards over fsspec into ``B T 3 H W`` batches in [-1, 1].

The names below are imported on first use (PEP 562): importing a light submodule such as
``mardini.data.augment`` (the trainer does) must not pull in PyAV and webdataset, which a
GPU benchmark machine or a latent-only job need not have.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ClipSpec": "clips",
    "decode_clip": "clips",
    "decode_frames": "clips",
    "frames_to_video": "clips",
    "Batch": "loader",
    "FrameBatch": "loader",
    "SharedMemoryError": "loader",
    "check_shm": "loader",
    "sample_bytes": "loader",
    "shm_bytes": "loader",
    "LatentBatch": "loader",
    "TrainClips": "loader",
    "ValClips": "loader",
    "train_batches": "loader",
    "train_loader": "loader",
    "val_batches": "loader",
    "val_loader": "loader",
    "clip_size": "shards",
    "list_shards": "shards",
    "shard_samples": "shards",
    "split_url": "shards",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
