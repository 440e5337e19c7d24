"""Streaming data: WebDataset shards over fsspec into ``B T 3 H W`` batches in [-1, 1]."""

from mardini.data.clips import ClipSpec, decode_clip
from mardini.data.loader import (
    Batch,
    LatentBatch,
    TrainClips,
    ValClips,
    train_batches,
    train_loader,
    val_batches,
    val_loader,
)
from mardini.data.shards import list_shards, shard_samples, split_url

__all__ = [
    "Batch",
    "ClipSpec",
    "LatentBatch",
    "TrainClips",
    "ValClips",
    "decode_clip",
    "list_shards",
    "shard_samples",
    "split_url",
    "train_batches",
    "train_loader",
    "val_batches",
    "val_loader",
]
