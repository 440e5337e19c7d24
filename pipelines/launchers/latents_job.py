"""The latent cache of a stage where the GPUs are: an Indexed Kubernetes Job whose pods each
encode every N-th mp4 shard (``mardini prep latents --parts N``, the index from the Job), or
locally one subprocess running the same command.

The flow only submits, waits (``batch_job``) and reads the finished cache's record back from
``--record-to``: a place keyed by what the cache depends on (``latents_key``), so a rerun of the
flow finds a finished cache and runs nothing, and reattaches to a Job still running. The command
itself resumes shard by shard, so a Job that failed halfway is simply run again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mardini.config import CurriculumConfig
from pipelines.launchers.batch_job import build_job
from pipelines.launchers.pytorchjob import LaunchConfig, dns_label


def latents_command(
    config_path: str, stage: str, shards: str, splits: tuple[str, ...], parts: int, record_to: str
) -> list[str]:
    """The command each part runs, locally and in the Job's pods."""
    words = ["python", "-m", "pipelines.cli", "prep", "latents", "--config", config_path]
    words += ["--stage", stage]
    words += ["--shards", shards, "--parts", str(parts), "--record-to", record_to]
    for split in splits:
        words += ["--split", split]
    return words


def latents_key(
    cfg: CurriculumConfig, stage: str, shards: str, splits: tuple[str, ...], sources: list[Any]
) -> str:
    """16 hex characters naming one cache: the data, the resolution, the autoencoder's config
    and seed, and what its weights come from (``sources``: each ``init_from`` entry with the
    weights digest of its export, so a retrained autoencoder makes a new key)."""
    st = cfg.stage(stage)
    text = json.dumps(
        {
            "shards": shards,
            "splits": list(splits),
            "resolution": st.resolution,
            "autoencoder": cfg.model.autoencoder.model_dump(mode="json"),
            "planner_downscale": cfg.model.planner_downscale,
            "seed": cfg.seed,
            "sources": sources,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def latents_job_name(curriculum: str, stage: str, key: str) -> str:
    """``{curriculum}-{stage}-latents-{key}``, a DNS label (63 characters at most)."""
    prefix = dns_label(f"{curriculum}-{stage}", max_len=63 - 9 - len(key[:8]))
    return f"{prefix}-latents-{key[:8]}"


def build_latents_job(
    cfg: CurriculumConfig,
    stage: str,
    command: list[str],
    key: str,
    parts: int,
    launch: LaunchConfig | None = None,
) -> Any:
    """The Indexed ``batch/v1`` Job of one latent cache: ``parts`` pods, one GPU each."""
    name = latents_job_name(cfg.name, stage, key)
    return build_job(cfg, stage, command, name, "latent-cache", None, launch, parts=parts)
