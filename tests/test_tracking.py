"""Tracking never stalls or kills training (issue 17): a real MLflow server goes away while a
stage's tracker logs, comes back, and gets everything; one that stays away is given up on."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mardini.train.tracking import Tracker

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, root: Path) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over a SQLite store and artifacts under ``root``."""
    log = open(root / f"server-{time.monotonic_ns()}.log", "w")  # the server writes it
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not answer on port {port} within 120 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A served MLflow the tracker reaches through ``MLFLOW_TRACKING_URI``; MLflow's own HTTP
    retries are off, so what is tested is the tracker's (a synchronous call would raise)."""
    port = _free_port()
    root = tmp_path / "mlflow"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    state = {"proc": _serve(port, root), "port": port, "root": root, "uri": uri}
    yield state
    if state["proc"] is not None:
        _stop(state["proc"])


def _wait_for_steps(client: MlflowClient, run_id: str, want: list[int]) -> list[int]:
    deadline = time.monotonic() + 60
    while True:
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        if steps == want or time.monotonic() > deadline:
            return steps
        time.sleep(0.2)


@pytest.mark.slow
def test_an_outage_costs_the_steps_nothing_and_loses_nothing(server, tmp_path):
    tracker = Tracker(True, backoff_s=0.2, max_backoff_s=1.0, give_up_s=300, flush_timeout_s=120)
    run_id = tracker.start("outage", "dm", str(tmp_path / "store"), tags={"stage": "dm"})
    client = MlflowClient(server["uri"])
    tracker.params({"stage": {"steps": 6}})
    for step in (1, 2, 3):
        tracker.metrics({"loss": 1.0 / step}, step=step)
    assert _wait_for_steps(client, run_id, [1, 2, 3]) == [1, 2, 3]

    _stop(server["proc"])  # the outage
    server["proc"] = None
    for step in (4, 5, 6):
        start = time.monotonic()
        tracker.metrics({"loss": 1.0 / step}, step=step)  # raises nothing, waits for nothing
        assert time.monotonic() - start < 2.0
    sample = tmp_path / "sample.gif"
    sample.write_bytes(b"GIF89a")
    tracker.artifact(sample, "samples")
    sample.unlink()  # the trainer's temporary files go at once; a copy waits in the queue

    server["proc"] = _serve(server["port"], server["root"])  # back, same store
    tracker.end()
    assert tracker.dropped == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["stage.steps"] == "6"
    assert _wait_for_steps(client, run_id, [1, 2, 3, 4, 5, 6]) == [1, 2, 3, 4, 5, 6]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/sample.gif"]


@pytest.mark.slow
def test_a_server_that_stays_away_is_given_up_on(server, tmp_path, caplog):
    tracker = Tracker(True, backoff_s=0.1, max_backoff_s=0.2, give_up_s=1.0, flush_timeout_s=30)
    tracker.start("gone", "dm", str(tmp_path / "store"), tags={})
    _stop(server["proc"])
    server["proc"] = None
    for step in (1, 2, 3):
        tracker.metrics({"loss": 1.0, "lr": 0.1}, step=step)
    with caplog.at_level("WARNING", logger="mardini.train.tracking"):
        tracker.end()  # returns: the stage's end is not held hostage either
    assert tracker.dropped == 6 + 1  # three steps of two metrics, batched, and the run's end
    assert "training goes on" in caplog.text and server["uri"] in caplog.text
