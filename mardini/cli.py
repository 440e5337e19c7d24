"""The ``mardini`` command line. Only this module prints; the library logs."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.k8s_cli import app as k8s_app

app = typer.Typer(help="MarDini: masked autoregressive diffusion for video.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s", help="Kubernetes: render the PyTorchJob of a stage.")
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


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Directory for the generated videos."),
    preset: str = typer.Option("tiny", help="Model preset."),
    steps: int = typer.Option(600, help="Training steps on the clip."),
    sample_steps: int = typer.Option(25, help="Denoising steps for the interpolation."),
    frames: int = typer.Option(8, help="Frames per clip."),
    size: int = typer.Option(32, help="Frame size in pixels (square)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Fit a small model to a real clip (bikes) and write an interpolated mp4."""
    from mardini.demo import run_demo

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        train = progress.add_task("train (joint)", total=steps, info="")
        denoise = progress.add_task("interpolate", total=sample_steps, info="")
        result = run_demo(
            out,
            preset=preset,
            frames=frames,
            size=size,
            steps=steps,
            sample_steps=sample_steps,
            seed=seed,
            on_step=lambda i, loss: progress.update(train, completed=i, info=f"loss {loss:.4f}"),
            on_sample_step=lambda i: progress.update(denoise, completed=i),
        )
    table = Table(title=f"MarDini demo ({preset})", show_header=False)
    for part, n in result.params.items():
        table.add_row(f"params: {part}", f"{n:,}")
    table.add_row(
        "held-out loss before → after", f"{result.loss_before:.4f} → {result.loss_after:.4f}"
    )
    table.add_row("training time", f"{result.train_seconds:.1f} s ({steps} steps)")
    table.add_row("interpolation time", f"{result.sample_seconds:.1f} s ({sample_steps} steps)")
    table.add_row("interpolation", str(result.video))
    table.add_row("ground truth | interpolation", str(result.side_by_side))
    console.print(table)


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
    """Train one stage on this machine: torchrun with NPROC ranks (CPU: gloo, DS_ACCELERATOR=cpu)."""
    import os
    import subprocess
    import sys

    import torch

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
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    console.print(f"[dim]{' '.join(cmd)}[/dim]")
    raise typer.Exit(subprocess.call(cmd, env=env))


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


if __name__ == "__main__":
    app()
