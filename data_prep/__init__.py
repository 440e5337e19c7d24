"""Raw videos to WebDataset shards on any fsspec store: ``python -m data_prep shard ...``.

Decode with PyAV, split at scene cuts, cut fixed-length clips, filter, encode mp4 clips, write
tar shards plus a manifest that accounts for every input. See ``data_prep.sharding``.
"""

from data_prep.clips import REASONS, process_video, split_of
from data_prep.config import PrepConfig, PrepError, load_prep_config
from data_prep.inputs import InputFile, list_inputs
from data_prep.sharding import (
    Chunk,
    claim_dataset,
    dataset_url,
    finish_dataset,
    plan_chunks,
    process_chunk,
    run_chunks,
    shard_videos,
)

__all__ = [
    "REASONS",
    "Chunk",
    "InputFile",
    "PrepConfig",
    "PrepError",
    "claim_dataset",
    "dataset_url",
    "finish_dataset",
    "list_inputs",
    "load_prep_config",
    "plan_chunks",
    "process_chunk",
    "process_video",
    "run_chunks",
    "shard_videos",
    "split_of",
]
