"""The ``mardini`` command: the library's commands (``mardini.cli``: train, eval, generate,
presets) and the layers above the library, assembled here where every layer is visible:
``mardini prep`` (``data_prep``, plus ``prep latents``, which needs a curriculum's autoencoder),
``mardini k8s``, ``mardini demo`` (the workflow on embedded defaults) and ``mardini promote``.
Only the command modules print; the library logs.

Importing this module imports neither Prefect nor MLflow nor DeepSpeed: the demo sets their
settings before they are imported (``pipelines.demo``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from data_prep.cli import _progress
from data_prep.cli import app as prep_app
from mardini.cli import app, console
from mardini.storage import write_json
from pipelines.k8s_cli import app as k8s_app

app.add_typer(
    prep_app, name="prep", help="Shard raw videos into WebDataset shards (python -m data_prep)."
)
app.add_typer(k8s_app, name="k8s", help="Kubernetes: render the PyTorchJob of a stage.")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Directory for the generated videos."),
    quick: bool = typer.Option(
        False, "--quick", help="Skip the workflow: fit one clip in this process (a minute or two)."
    ),
    config: str = typer.Option("configs/tiny.yaml", help="Curriculum for the workflow demo."),
    store: str = typer.Option(None, help="fsspec root (default $MARDINI_STORE or ./.mardini)."),
    preset: str = typer.Option("tiny", help="Model preset (--quick)."),
    steps: int = typer.Option(600, help="Training steps on the clip."),
    sample_steps: int = typer.Option(25, help="Denoising steps for the interpolation."),
    frames: int = typer.Option(8, help="Frames per clip."),
    size: int = typer.Option(32, help="Frame size in pixels (square)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """The whole workflow on embedded defaults: shard the bundled clips, train, gate and promote
    the tiny curriculum (2 CPU ranks a stage), generate from the champion. --quick: one clip."""
    if not quick:
        _workflow_demo(config, store, out)
        return
    from mardini.quick_demo import run_demo

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


class StageConsole(logging.Handler):
    """Draws ``mardini.progress`` events: one updating line per stage on a terminal (rich),
    a few plain lines per stage otherwise; gate reports in full."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.bars: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.losses: dict[str, str] = {}
        # Plain mode: (time, step) of a stage's first reported step, and its last printed quarter.
        self.first: dict[str, tuple[float, int]] = {}
        self.quarter: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        from mardini.progress import event_of

        event = event_of(record)
        if event is None:
            return
        try:
            if self.console.is_terminal:
                self._draw(event)
            else:
                self._print(event)
        except Exception:  # a broken console must not stop the training it reports on
            self.handleError(record)

    def stop(self) -> None:
        """Stop the live display (the lines stay on screen) and stop listening.

        Not ``close``: a library's ``logging.config.dictConfig`` (Prefect's, at import) closes
        every existing handler and expects it to keep working."""
        from mardini.progress import LOGGER

        if self.bars is not None:
            self.bars.stop()
            self.bars = None
        logging.getLogger(LOGGER).removeHandler(self)

    def _draw(self, event) -> None:
        from rich.progress import TimeRemainingColumn
        from rich.text import Text

        if self.bars is None:
            self.bars = Progress(
                TextColumn("{task.description:<20}"),
                BarColumn(bar_width=30),
                TextColumn("{task.completed:>4}/{task.total:<4}"),
                TextColumn("{task.fields[info]:<40}"),
                TimeRemainingColumn(elapsed_when_finished=True),
                console=self.console,
            )
            self.bars.start()
        if event.stage not in self.tasks:
            total = event.total or 1
            self.tasks[event.stage] = self.bars.add_task(event.stage, total=total, info="")
        task = self.tasks[event.stage]
        if event.loss is not None:
            self.losses[event.stage] = f"loss {event.loss:.4f}"
        loss = self.losses.get(event.stage)
        if event.phase == "train":
            info = loss or "training"
            self.bars.update(task, total=event.total, completed=event.step or 0, info=info)
            return
        if event.phase == "gates":
            self.bars.console.print(Text(event.text))
            state = "gates passed" if event.passed else "gates FAILED"
        else:
            state = {"evaluate": "evaluating"}.get(event.phase, event.text)
            self.bars.update(task, completed=self.bars.tasks[task].total or 1)
        self.bars.update(task, info=" · ".join(part for part in (loss, state) if part))

    def _print(self, event) -> None:
        name = event.stage
        if event.phase == "train" and event.step:
            now = time.monotonic()
            t0, s0 = self.first.setdefault(name, (now, event.step))
            quarter = 4 * event.step // max(1, event.total or 1)
            if quarter <= self.quarter.get(name, 0):
                return
            self.quarter[name] = quarter
            eta = ""
            if event.step > s0:
                left = (now - t0) / (event.step - s0) * ((event.total or 0) - event.step)
                eta = f", ETA {int(left) // 60}:{int(left) % 60:02d}"
            line = f"{name}: step {event.step}/{event.total}, loss {event.loss:.4f}{eta}"
        elif event.phase == "train":
            line = f"{name}: training, {event.total} steps"
        elif event.phase == "evaluate":
            line = f"{name}: evaluating on the held-out clips"
        elif event.phase == "gates":
            line = event.text
        else:
            line = f"{name}: {event.phase}, {event.text}"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _log_to_file(path: Path, console: Console) -> StageConsole:
    """Send every log record to ``path``; the console shows only the stage progress events."""
    from mardini.progress import LOGGER

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)  # --verbose keeps DEBUG
    logging.captureWarnings(True)  # library warnings go to the file too
    # A library that set up its own stderr handler before the demo could prevent it.
    for name in ("mlflow", "py.warnings"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    stages = StageConsole(console)
    logging.getLogger(LOGGER).addHandler(stages)
    return stages


def _workflow_demo(config: str, store: str | None, out: Path) -> None:
    from pipelines.demo import log_file, run_workflow_demo

    path = log_file(store)
    stages = _log_to_file(path, console)
    console.print(
        f"MarDini workflow demo: {config}; full log in {path}", highlight=False, soft_wrap=True
    )
    start = time.monotonic()
    try:
        result = run_workflow_demo(config, store, out)
    except Exception as err:
        logging.getLogger(__name__).exception("the demo failed")
        stages.stop()  # end the live lines before the message
        # The first line says what failed (a gate report is on screen already); the log has
        # the rest: a failing rank's last lines, the traceback.
        head = (str(err).strip().splitlines() or [type(err).__name__])[0]
        console.print(f"[red]demo failed:[/red] {escape(head)}", soft_wrap=True, highlight=False)
        console.print(f"details in {path}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        stages.stop()
    total = time.monotonic() - start
    counts = result.manifest["counts"]
    table = Table(title="MarDini workflow demo", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths in full, never cut with an ellipsis
    table.add_row(
        "shards",
        f"{counts['inputs']} videos -> {counts.get('clips', '?')} clips ({result.seconds['shard']:.0f} s)",
    )
    for stage, version in result.promoted.items():
        table.add_row(f"stage {stage}", f"promoted, model version {version}")
    table.add_row("curriculum", f"{result.seconds['curriculum']:.0f} s")
    metrics = result.champion_metrics
    for task, label in (("interp", "interpolation"), ("i2v", "image-to-video")):
        if f"{task}_psnr" in metrics:
            table.add_row(
                f"champion {label}, held out",
                f"model {metrics[f'{task}_psnr']:.2f} dB | nearest frame "
                f"{metrics.get(f'baseline_nearest_{task}_psnr', float('nan')):.2f} | linear blend "
                f"{metrics.get(f'baseline_blend_{task}_psnr', float('nan')):.2f}",
            )
        if f"fvd_{task}" in metrics:
            table.add_row(
                f"champion {label}, FVD (lower is better)",
                f"model {metrics[f'fvd_{task}']:.0f} | nearest frame "
                f"{metrics.get(f'baseline_nearest_fvd_{task}', float('nan')):.0f} | linear blend "
                f"{metrics.get(f'baseline_blend_fvd_{task}', float('nan')):.0f} | real vs real "
                f"{metrics.get('fvd_real_halves', float('nan')):.0f} "
                f"({metrics.get('fvd_clips', 0):.0f} clips: biased, compare within this row)",
            )
    table.add_row("champion interpolation", f"{result.video} ({result.seconds['generate']:.0f} s)")
    table.add_row(
        "comparison, held-out clip", f"{result.summary_png} (animated: {result.summary_gif})"
    )
    table.add_row("total", f"{total:.0f} s")
    table.add_row("MLflow UI", f".venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}")
    console.print(table)
    console.print(f"full log: {path}", highlight=False, soft_wrap=True)  # one line, to copy


@app.command()
def promote(
    curriculum: str = typer.Option(None, help="Curriculum name (registered model mardini-NAME)."),
    version: str = typer.Option(None, help="Model version to promote."),
    stage: str = typer.Option(None, help="Stage alias to move to that version."),
    champion: bool = typer.Option(False, help="Also move the champion alias."),
    approve: bool = typer.Option(
        False, "--approve", help="Approve the candidate a waiting flow run asks about."
    ),
    reject: bool = typer.Option(
        False, "--reject", help="Reject the candidate a waiting flow run asks about."
    ),
    flow_run: str = typer.Option(
        None, help="The waiting flow run (id); default: the only train-curriculum run waiting."
    ),
    note: str = typer.Option("", help="Why: recorded on the model version with your name."),
    store: str = typer.Option(
        None, help="Store whose SQLite MLflow to use (unless MLFLOW_TRACKING_URI)."
    ),
) -> None:
    """Promote a registered version by hand (move alias STAGE, and champion, to VERSION), or
    answer a flow run waiting at a manual stage: --approve / --reject [--flow-run ID] [--note]."""
    if approve or reject:
        if approve and reject:
            raise typer.BadParameter("give --approve or --reject, not both")
        from pipelines.approval import Decision, answer_waiting_run, cli_reviewer

        decision = Decision(
            decision="approve" if approve else "reject", note=note, reviewer=cli_reviewer()
        )
        try:
            run_name = answer_waiting_run(decision, flow_run)
        except LookupError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(1) from err
        console.print(f"flow run {run_name}: {decision.decision} sent (by {decision.reviewer})")
        return
    missing = [n for n, v in (("--curriculum", curriculum), ("--version", version),
                              ("--stage", stage)) if not v]  # fmt: skip
    if missing:
        raise typer.BadParameter(
            f"promoting by hand needs {', '.join(missing)}; or answer a waiting flow run "
            "with --approve / --reject"
        )
    from mardini.mlflow_setup import mlflow_client, tracking_uri
    from pipelines.promotion import promote as move_aliases
    from pipelines.promotion import registered_name

    uri = tracking_uri(store)
    aliases = move_aliases(
        mlflow_client(uri),
        registered_name(curriculum),
        version,
        stage,
        last=champion,
    )
    console.print(
        f"{registered_name(curriculum)}: {', '.join('@' + a for a in aliases)} -> version {version}"
    )


def latents(
    config: Path = typer.Option(..., "--config", "-c", help="Curriculum YAML (model, data)."),
    stage: str = typer.Option(
        ..., "--stage", "-s", help="Stage whose resolution and autoencoder to cache for."
    ),
    override: list[str] = typer.Option([], "--override", "-o", help="Config key=value."),
    shards: str = typer.Option(
        None, help="mp4 shard root (default: the stage's dataset, as training reads it)."
    ),
    store: str = typer.Option(None, help="fsspec root (default $MARDINI_STORE or ./.mardini)."),
    dtype: str = typer.Option("float32", help="float32 (exact) or float16 (half the bytes)."),
    device: str = typer.Option(None, help="Where to encode (default: cuda if present, else cpu)."),
    overwrite: bool = typer.Option(False, help="Replace a cache written with another dtype."),
    split: list[str] = typer.Option(["train", "val"], "--split", help="Splits to cache."),
    parts: int = typer.Option(1, min=1, help="Split the work into this many parts (pods)."),
    index: int = typer.Option(
        None,
        help="This part's index (default $JOB_COMPLETION_INDEX, set in a Kubernetes Indexed "
        "Job's pods, else 0).",
    ),
    record_to: str = typer.Option(
        None, "--record-to", help="Also write the finished cache's latents.json here (a URL)."
    ),
) -> None:
    """Cache the autoencoder latents (both resolutions) of every clip, beside the mp4 shards.

    Then set data.latents: true and the stage trains from {shards}/latents/ without decoding
    or encoding a frame. With --parts N, N processes (an Indexed Job's pods) each encode every
    N-th shard; whichever finishes last writes latents.json. Rerun to resume.
    """
    import torch

    from mardini.config import ConfigError, load_config
    from mardini.data.latent_cache import LatentCacheError, cache_latents
    from mardini.export import stage_autoencoder
    from mardini.layout import shards_url
    from mardini.storage import store_root

    try:
        cfg = load_config(config, override)
        st = cfg.stage(stage)
        root = store_root(store)
        source = shards or shards_url(cfg, root, st)
        autoencoder = stage_autoencoder(cfg, st, root)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with _progress() as progress:
            task = progress.add_task("listing shards", total=None, info="")
            clips = {"done": 0}

            def on_plan(n: int) -> None:
                progress.update(task, description=f"encoding ({st.resolution} px)", total=n)

            def on_shard(url: str, count: int, skipped: bool) -> None:
                clips["done"] += count
                info = f"{clips['done']} clips" + (" (resuming)" if skipped else "")
                progress.update(task, advance=1, info=info)

            record = cache_latents(
                source,
                autoencoder,
                planner_downscale=cfg.model.planner_downscale,
                resolution=st.resolution,
                splits=tuple(split),
                dtype=dtype,
                device=device,
                overwrite=overwrite,
                on_plan=on_plan,
                on_shard=on_shard,
                part=(_part_index(index), parts),
            )
    except (LatentCacheError, ConfigError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if not record["complete"]:
        console.print(f"part {_part_index(index)} of {parts} done; the last part writes "
                      f"{record['url']}/latents.json")  # fmt: skip
        return
    if record_to:
        write_json(record_to, record)
    for split, info in record["splits"].items():
        console.print(f"  {split}: {info['clips']} clips in {len(info['shards'])} shards")
    console.print(f"latents: {record['url']} (autoencoder {record['fingerprint'][:12]})")
    console.print("train from them with: -o data.latents=true")


def _part_index(index: int | None) -> int:
    """``--index``, else the pod's index in a Kubernetes Indexed Job, else 0."""
    if index is not None:
        return index
    value = os.environ.get("JOB_COMPLETION_INDEX", "0")
    if not value.isdigit():
        raise typer.BadParameter(
            f"JOB_COMPLETION_INDEX={value!r} is not an index", param_hint="--index"
        )
    return int(value)


prep_app.command("latents")(latents)


if __name__ == "__main__":
    app()
