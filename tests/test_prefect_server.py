"""The front door on a real Prefect server: serve the local deployments, then
`prefect deployment run train-curriculum/local` and wait for Completed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.promotion import alias_version, registered_name
from tests.conftest import _free_port
from tests.test_curriculum_flow import _config

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).with_name("prefect"))


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{api}/health", server, 180)
        yield {**env, "PREFECT_API_URL": api}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_deployment_run_train_curriculum_local(tmp_path, train_shards, prefect_server):
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    config = _config(tmp_path, train_shards, "served")
    serve_log = tmp_path / "serve.log"  # the flow runs in this process: its log says why it failed
    serve = subprocess.Popen(
        [sys.executable, "-m", "pipelines.serve"], env=env, cwd=Path(__file__).parents[1],
        stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120  # until serve has registered its deployments
        while True:
            found = subprocess.run(
                [PREFECT, "deployment", "ls"], env=env, capture_output=True, text=True
            )
            if "train-curriculum/local" in found.stdout:
                break
            assert time.time() < deadline, found.stdout + found.stderr
            assert serve.poll() is None, "pipelines.serve exited"
            time.sleep(2)
        run = subprocess.run(
            [PREFECT, "deployment", "run", "train-curriculum/local",
             "--param", f"config={config}", "--param", f"store={tmp_path / 'store'}",
             "--watch", "--watch-timeout", "900"],
            env=env, capture_output=True, text=True, timeout=1000,
        )  # fmt: skip
        assert run.returncode == 0, (
            run.stdout[-1500:] + "\n--- serve log ---\n" + (serve_log.read_text()[-30000:])
        )
        assert "Completed" in run.stdout
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert alias_version(client, registered_name("served"), "champion") is not None
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=30)
