"""The demo's console: the trainer's step lines become one progress line per stage; every other
log record goes to the log file, not to the screen."""

from __future__ import annotations

import io
import logging
import logging.config
import warnings

import pytest
from rich.console import Console

from mardini.config import load_config
from mardini.progress import LOGGER, StageEvent, emit, event_of, parse_step, step_line
from mardini.train.engine import _Progress
from pipelines.cli import StageConsole, _log_to_file
from pipelines.launchers.local import relay_line
from tests.conftest import CONFIGS


class Events(logging.Handler):
    """Collects the StageEvents logged on the progress logger."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[StageEvent] = []

    def emit(self, record: logging.LogRecord) -> None:
        if (event := event_of(record)) is not None:
            self.events.append(event)


@pytest.fixture
def events():
    handler = Events()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.events
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    mlflow = logging.getLogger("mlflow")
    saved_mlflow = list(mlflow.handlers), mlflow.propagate
    # The `mardini` command's callback quietens httpx; a test that ran it earlier leaves it so.
    httpx = logging.getLogger("httpx")
    saved_httpx = httpx.level
    httpx.setLevel(logging.NOTSET)
    yield
    httpx.setLevel(saved_httpx)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    mlflow.handlers[:] = saved_mlflow[0]
    mlflow.propagate = saved_mlflow[1]
    logging.captureWarnings(False)


def test_trainer_step_line_reads_back_from_a_rank_log_line(caplog):
    stage = load_config(CONFIGS / "tiny.yaml").stage("mar")
    with caplog.at_level(logging.INFO, logger="mardini.train.engine"):
        progress = _Progress(True, stage, 0)
        for step in range(1, stage.steps + 1):
            progress.update(step, 0.5 / step)
    # As the rank's log formatter writes it, and the launcher reads it.
    lines = [f"2026-12-02 18:20:56,304 [rank 0] INFO {r.name}: {r.message}" for r in caplog.records]
    parsed = [parse_step(line) for line in lines]
    assert all(parsed)
    assert [p.step for p in parsed] == [
        1,
        *range(stage.log_every, stage.steps + 1, stage.log_every),
    ]
    assert parsed[-1] == StageEvent(
        "mar", "train", step=stage.steps, total=stage.steps, loss=0.5 / stage.steps
    )


def test_parse_step_rejects_other_lines_and_reads_negative_losses():
    assert parse_step("stage mar finished: /x/final") is None
    assert parse_step("INFO something: step 3 of 4") is None
    event = parse_step(step_line("joint-i2v", 3, 100, -3.5))
    assert (event.stage, event.step, event.total, event.loss) == ("joint-i2v", 3, 100, -3.5)


def test_launcher_relays_step_lines_as_progress_events(events, caplog):
    with caplog.at_level(logging.INFO):
        relay_line("dm", 0, "W1202 torch/distributed/run.py:874] something else")
        relay_line(
            "dm",
            0,
            f"2026-12-02 [rank 0] INFO mardini.train.engine: {step_line('dm', 10, 100, 0.25)}",
        )
    assert events == [StageEvent("dm", "train", step=10, total=100, loss=0.25)]
    # Every line still reaches the log.
    assert sum("[dm node 0]" in r.getMessage() for r in caplog.records) == 2


def _plain(events: list[StageEvent]) -> list[str]:
    buffer = io.StringIO()
    handler = StageConsole(Console(file=buffer, force_terminal=False, width=200))
    for event in events:
        record = logging.LogRecord(LOGGER, logging.INFO, "", 0, event.describe(), None, None)
        record.stage_event = event
        handler.emit(record)
    handler.stop()
    return buffer.getvalue().splitlines()


def test_plain_console_prints_a_few_lines_per_stage_with_loss_and_eta():
    stream = [StageEvent("mar", "train", step=0, total=80)]
    stream += [
        StageEvent("mar", "train", step=s, total=80, loss=1.0 / s) for s in (1, *range(10, 81, 10))
    ]
    stream += [
        StageEvent("mar", "evaluate"),
        StageEvent(
            "mar",
            "gates",
            text="gates of stage 'mar': PASSED\n  heldout_loss 0.5 <= 0.7",
            passed=True,
        ),
        StageEvent("mar", "promoted", text="version 1 as mar"),
        StageEvent("dm", "skipped", text="already promoted (version 2)"),
    ]
    lines = _plain(stream)
    steps = [line for line in lines if line.startswith("mar: step")]
    assert [line.split()[2] for line in steps] == ["20/80,", "40/80,", "60/80,", "80/80,"]
    assert all("loss" in line and "ETA" in line for line in steps)
    assert lines[0] == "mar: training, 80 steps"
    assert "gates of stage 'mar': PASSED" in lines and "  heldout_loss 0.5 <= 0.7" in lines
    assert lines[-2:] == [
        "mar: promoted, version 1 as mar",
        "dm: skipped, already promoted (version 2)",
    ]
    assert len(lines) <= 10


def test_terminal_console_draws_one_line_per_stage():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    handler = StageConsole(console)
    for event in [
        StageEvent("mar", "train", step=0, total=80),
        StageEvent("mar", "train", step=40, total=80, loss=0.4321),
        StageEvent("mar", "gates", text="gates of stage 'mar': PASSED", passed=True),
        StageEvent("dm", "train", step=10, total=100, loss=0.25),
    ]:
        record = logging.LogRecord(LOGGER, logging.INFO, "", 0, event.describe(), None, None)
        record.stage_event = event
        handler.emit(record)
    handler.stop()
    out = buffer.getvalue()
    assert "40/80" in out and "loss 0.4321" in out and "10/100" in out
    assert "gates of stage 'mar': PASSED" in out


def test_demo_logging_sends_library_records_to_the_file_not_the_console(
    tmp_path, restore_logging, capsys
):
    mlflow = logging.getLogger("mlflow")
    mlflow.addHandler(logging.StreamHandler())  # as MLflow's own logging set-up does
    mlflow.propagate = False
    buffer = io.StringIO()
    path = tmp_path / "logs" / "demo.log"
    stages = _log_to_file(path, Console(file=buffer, force_terminal=False))
    try:
        logging.getLogger("httpx").info(
            'HTTP Request: POST http://127.0.0.1/api/logs/ "HTTP/1.1 201"'
        )
        mlflow.warning("Passing a Python object as `python_model` ...")
        warnings.warn("Add type hints to the `predict` method", UserWarning, stacklevel=1)
        # Prefect's import runs dictConfig, which closes every existing handler.
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
        emit(StageEvent("mar", "train", step=0, total=80))
    finally:
        stages.stop()
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    assert "HTTP Request" in text and "python_model" in text and "type hints" in text
    assert "stage mar: step 0/80" in text  # progress events are in the file too
    assert buffer.getvalue().splitlines() == ["mar: training, 80 steps"]
    captured = capsys.readouterr()
    assert "HTTP Request" not in captured.err + captured.out
    assert "python_model" not in captured.err + captured.out


def test_a_failed_demo_prints_what_failed_and_where_the_log_is(
    tmp_path, restore_logging, monkeypatch
):
    from typer.testing import CliRunner

    import pipelines.demo
    from pipelines.cli import app

    def fail(*args, **kwargs):
        emit(
            StageEvent(
                "dm", "gates", text="gates of stage 'dm': FAILED\n  FAIL interp_psnr", passed=False
            )
        )
        logging.getLogger("pipelines.launchers.local").info("[dm node 0] a rank's chatter")
        raise RuntimeError(
            "stage 'dm' failed its gates (MLflow: run x)\ngates of stage 'dm': FAILED"
        )

    monkeypatch.setattr(pipelines.demo, "run_workflow_demo", fail)
    result = CliRunner().invoke(app, ["demo", "--store", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "gates of stage 'dm': FAILED" in lines  # the report, once
    assert "demo failed: stage 'dm' failed its gates (MLflow: run x)" in lines
    assert f"details in {tmp_path}/logs/demo-" in "".join(lines[-3:])  # a long path may wrap
    assert "chatter" not in result.output
    (log,) = (tmp_path / "logs").glob("demo-*.log")
    assert "chatter" in log.read_text() and "Traceback" in log.read_text()


def test_the_final_table_names_the_pictures_and_the_log(tmp_path, restore_logging, monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    import pipelines.demo
    from pipelines.cli import app
    from pipelines.demo import WorkflowDemo

    out = Path(tmp_path, "out")
    done = WorkflowDemo(
        manifest={"counts": {"inputs": 59, "clips": 435}},
        promoted={"mar": "1", "joint-i2v": "4"},
        video=out / "interpolation.mp4",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        seconds={"shard": 1.0, "curriculum": 2.0, "generate": 3.0},
        champion_metrics={"interp_psnr": 26.5, "baseline_nearest_interp_psnr": 25.6},
        summary_png=out / "summary.png",
        summary_gif=out / "summary.gif",
    )
    monkeypatch.setattr(pipelines.demo, "run_workflow_demo", lambda *a, **k: done)
    result = CliRunner().invoke(app, ["demo", "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    cells = "".join(line.strip("│ ") for line in result.output.splitlines())
    assert str(out / "summary.png") in cells and str(out / "summary.gif") in cells
    assert "model 26.50 dB | nearest frame 25.60" in " ".join(result.output.split())
    assert result.output.splitlines()[-1].startswith(f"full log: {tmp_path}/logs/demo-")
