"""Manual promotion on a real Prefect server: a manual stage suspends its deployment run after
its gates pass; approving it (terminal) promotes and continues without retraining; rejecting it
(the API call the UI's Resume form makes) moves nothing and fails with the note."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mardini.config import load_config
from pipelines.approval import (
    APPROVAL,
    BY,
    NOTE,
    Decision,
    pending_version,
    record_decision,
)
from pipelines.promotion import alias_version, registered_name
from tests.test_curriculum_flow import _config
from tests.test_prefect_server import PREFECT, prefect_server  # noqa: F401  (a fixture)

ROOT = Path(__file__).parents[1]
MARDINI = str(Path(sys.executable).with_name("mardini"))


def _manual_config(
    tmp_path: Path, shards: str, name: str, timeout_s: int = 900, stages: int = 2
) -> str:
    """tiny's first ``stages`` stages on the test shards; the last is manual."""
    path = Path(_config(tmp_path, shards, name))
    raw = yaml.safe_load(path.read_text())
    raw["stages"] = raw["stages"][:stages]
    raw["stages"][-1]["promotion"] = "manual"
    raw["approval_timeout_s"] = timeout_s
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# ----------------------------------------------------------------------------- without a server


def test_stage_promotion_falls_back_to_the_curriculum(tmp_path):
    cfg = load_config(_manual_config(tmp_path, "unused", "c"))
    assert [cfg.promotion_of(s.name) for s in cfg.stages] == ["auto", "manual"]
    everything = load_config(_manual_config(tmp_path, "unused", "c"), ["promotion=manual"])
    assert everything.promotion_of("mar") == "manual"
    with pytest.raises(Exception, match="promotion"):
        load_config(_manual_config(tmp_path, "unused", "c"), ["promotion=sometimes"])


def _version(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("mardini-c")
    (tmp_path / "weights").mkdir()
    version = client.create_model_version("mardini-c", str(tmp_path / "weights")).version
    client.update_model_version("mardini-c", version, description="gate report")
    client.set_registered_model_alias("mardini-c", "dm-candidate", version)
    return client, "mardini-c", str(version)


def test_a_decision_is_recorded_on_the_version(tmp_path):
    client, name, version = _version(tmp_path)
    decision = Decision(decision="reject", note="blurry faces", reviewer="ada")
    line = record_decision(client, name, version, decision, "rejected")
    mv = client.get_model_version(name, version)
    assert (mv.tags[APPROVAL], mv.tags[BY], mv.tags[NOTE]) == ("rejected", "ada", "blurry faces")
    assert line.startswith("Rejected by ada at ") and line.endswith(": blurry faces")
    assert mv.description.startswith(line) and "gate report" in mv.description
    # Nobody named in the UI's form: said so, not left blank.
    record_decision(client, name, version, Decision(decision="approve"), "approved")
    assert client.get_model_version(name, version).tags[BY] == "unnamed (Prefect UI)"


def test_a_pending_candidate_of_another_flow_run_expires(tmp_path):
    client, name, version = _version(tmp_path)
    assert pending_version(client, name, "dm", "run-a") is None  # not pending: nothing to resume
    client.set_model_version_tag(name, version, APPROVAL, "pending")
    client.set_model_version_tag(name, version, "approval.flow_run", "run-a")
    assert pending_version(client, name, "dm", "run-a") == version  # the resumed run itself
    assert pending_version(client, name, "dm", "run-b") is None  # a new run: train again
    assert client.get_model_version(name, version).tags[APPROVAL] == "expired"


# ----------------------------------------------------------------------------- on a server


def _flow_run(env: dict, config: str, store: Path) -> str:
    """Start a train-curriculum/local deployment run; returns its id."""
    from prefect.client.orchestration import get_client

    run = subprocess.run(
        [PREFECT, "deployment", "run", "train-curriculum/local",
         "--param", f"config={config}", "--param", f"store={store}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with _api(env), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    (found,) = [r for r in runs if r.parameters.get("config") == config]
    return str(found.id)


class _api:
    """PREFECT_API_URL of the test server for in-process client calls."""

    def __init__(self, env: dict) -> None:
        self.url = env["PREFECT_API_URL"]

    def __enter__(self):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._ctx = temporary_settings({PREFECT_API_URL: self.url})
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _wait_state(env: dict, run_id: str, types: set[str], seconds: float):
    from uuid import UUID

    from prefect.client.orchestration import get_client

    deadline = time.time() + seconds
    with _api(env), get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(UUID(run_id)).state
            if state is not None and state.type.value in types:
                return state
            assert state is None or not state.is_final(), f"flow run ended {state}"
            assert time.time() < deadline, f"flow run still {state} after {seconds} s"
            time.sleep(2)


def _stage_runs(uri: str, curriculum: str) -> list[str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(curriculum)
    return sorted(
        r.data.tags["stage"]
        for r in client.search_runs([experiment.experiment_id])
        if "stage" in r.data.tags
    )


@pytest.fixture
def served(tmp_path, prefect_server):  # noqa: F811
    """The local deployments served against the test server (as `make serve` does)."""
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    serve = subprocess.Popen(
        [sys.executable, "-m", "pipelines.serve"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while (
            "train-curriculum/local"
            not in subprocess.run(
                [PREFECT, "deployment", "ls"], env=env, capture_output=True, text=True
            ).stdout
        ):
            assert time.time() < deadline and serve.poll() is None, "pipelines.serve did not serve"
            time.sleep(2)
        yield env
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=30)


@pytest.mark.slow
def test_manual_stage_waits_then_approve_and_reject(tmp_path, train_shards, served):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    env, uri = served, served["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, registry_uri=uri)

    # 1. Suspended at the manual stage, with its evidence, the earlier stage promoted.
    config = _manual_config(tmp_path, train_shards, "approved")
    run_id = _flow_run(env, config, tmp_path / "store")
    state = _wait_state(env, run_id, {"PAUSED"}, 600)
    assert state.name == "Suspended"  # a deployment's run frees its process while it waits
    name = registered_name("approved")
    assert alias_version(client, name, "mar") is not None
    assert alias_version(client, name, "dm") is None
    candidate = alias_version(client, name, "dm-candidate")
    tags = client.get_model_version(name, candidate).tags
    assert tags[APPROVAL] == "pending" and tags["approval.flow_run"] == run_id
    assert "Sent for approval" in client.get_model_version(name, candidate).description
    from tests.test_curriculum_flow import _artifacts

    with _api(env):
        (evidence,) = _artifacts(run_id, key="stage-dm-approval")
        report = _artifacts(run_id, key="stage-dm")
    assert "Resume" in evidence.data and f"--flow-run {run_id}" in evidence.data
    assert "interp.gif" in evidence.data  # the labelled samples
    assert report and "Gate report" in report[-1].data

    # 2. Approved from a terminal: promoted, continued, nothing retrained.
    answer = subprocess.run(
        [MARDINI, "promote", "--approve", "--note", "sharp enough"],
        env={**env, "USER": "grace"}, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout + answer.stderr
    _wait_state(env, run_id, {"COMPLETED"}, 300)
    assert alias_version(client, name, "dm") == candidate
    assert alias_version(client, name, "champion") == candidate
    tags = client.get_model_version(name, candidate).tags
    assert (tags[APPROVAL], tags[BY], tags[NOTE]) == ("approved", "grace", "sharp enough")
    assert _stage_runs(uri, "approved") == ["dm", "mar"]  # one training run each

    # 3. Rejected through the API the UI's form uses: nothing moves, the flow fails with the note.
    config = _manual_config(tmp_path, train_shards, "rejected", stages=1)
    run_id = _flow_run(env, config, tmp_path / "store")
    _wait_state(env, run_id, {"PAUSED"}, 600)
    decision = {"decision": "reject", "note": "colours drift", "reviewer": "ada"}
    with _api(env):
        resume_flow_run(UUID(run_id), run_input=decision)
    with pytest.raises(AssertionError, match="flow run ended"):
        _wait_state(env, run_id, {"COMPLETED"}, 300)
    with _api(env), get_client(sync_client=True) as prefect:
        failed = prefect.read_flow_run(UUID(run_id)).state
    assert failed.type.value == "FAILED" and "colours drift" in (failed.message or "")
    name = registered_name("rejected")
    assert alias_version(client, name, "mar") is None
    assert alias_version(client, name, "champion") is None
    candidate = alias_version(client, name, "mar-candidate")
    tags = client.get_model_version(name, candidate).tags
    assert (tags[APPROVAL], tags[BY], tags[NOTE]) == ("rejected", "ada", "colours drift")

    # Nothing waits now: the terminal says so instead of guessing.
    answer = subprocess.run(
        [MARDINI, "promote", "--reject"],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert answer.returncode == 1 and "no train-curriculum flow run is waiting" in answer.stdout
