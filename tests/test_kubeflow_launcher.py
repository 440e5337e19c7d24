"""The Kubeflow launcher up to the cluster boundary: a stand-in for TrainingClient (no cluster
exists here) records what the launcher asks of the API; everything on our side is real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kubernetes.client.exceptions import ApiException

from mardini.config import load_config
from pipelines.launchers.contract import LaunchError
from pipelines.launchers.kubeflow import run_pytorchjob
from tests.conftest import CONFIGS


def _job(*conditions: tuple[str, str]):
    return SimpleNamespace(
        status=SimpleNamespace(
            conditions=[SimpleNamespace(type=t, status=s) for t, s in conditions]
        )
    )


def _pod(name: str, phase: str, reason: str | None = None):
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name),
        status=SimpleNamespace(phase=phase, reason=reason, message="node low on memory"),
    )


class FakeTrainingClient:
    """The TrainingClient methods the launcher uses, answering from scripted cluster states.

    ``existing`` holds jobs an earlier flow run created (name -> their state): creating one of
    those names fails as the SDK does on HTTP 409."""

    def __init__(self, states, pods=None, interrupt_after: int | None = None, existing=None):
        self.states, self.pods = list(states), pods or []
        self.created, self.deleted, self.polls = [], [], 0
        self.interrupt_after = interrupt_after
        self.existing = dict(existing or {})

    def create_job(self, job, namespace):
        if job.metadata.name in self.existing:
            conflict = ApiException(status=409, reason="Conflict")
            raise RuntimeError(f"Failed to create PyTorchJob: {job.metadata.name}") from conflict
        self.created.append((job, namespace))

    def get_job(self, name, namespace, job_kind):
        if name in self.existing and not any(j.metadata.name == name for j, _ in self.created):
            if self.existing[name] is not None:  # a finished (failed) job answers as it is
                return self.existing[name]
        self.polls += 1
        if self.interrupt_after is not None and self.polls > self.interrupt_after:
            raise KeyboardInterrupt  # the flow run was cancelled mid-wait
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def get_job_pods(self, name, namespace):
        return self.pods

    def get_job_logs(self, name, namespace, is_master):
        return {
            f"{name}-master-0": "step 1\nTraceback\nRuntimeError: CUDA out of memory",
            f"{name}-worker-0": "ok",
        }, {}

    def delete_job(self, name, namespace, job_kind):
        self.deleted.append(name)


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIGS / "paper.yaml")


def test_success_submits_the_built_job_and_keeps_it(cfg):
    client = FakeTrainingClient(
        [_job(("Created", "True")), _job(("Running", "True")), _job(("Succeeded", "True"))]
    )
    run_pytorchjob(
        cfg,
        "mar",
        nnodes=2,
        nproc_per_node=8,
        image="reg/mardini:1",
        run_id="abc",
        client=client,
        poll_s=0,
        max_restarts=5,
    )
    ((job, namespace),) = client.created
    assert job.kind == "PyTorchJob" and namespace == job.metadata.namespace
    assert job.spec.pytorch_replica_specs["Worker"].replicas == 2
    assert (
        job.spec.pytorch_replica_specs["Worker"].template.spec.containers[0].image
        == "reg/mardini:1"
    )
    assert job.spec.elastic_policy.max_restarts == 5
    assert job.metadata.labels["mardini.io/mlflow-run-id"] == "abc"
    assert client.deleted == []


def test_failure_raises_with_the_master_log_tail(cfg):
    client = FakeTrainingClient([_job(("Running", "True")), _job(("Failed", "True"))])
    with pytest.raises(LaunchError, match="failed") as err:
        run_pytorchjob(cfg, "mar", client=client, poll_s=0)
    assert "CUDA out of memory" in str(err.value)
    assert str(err.value).index("master-0") < str(err.value).index("worker-0")
    assert client.deleted == []  # a failed job stays for `kubectl describe`; it holds no GPUs


def test_an_evicted_pod_is_reported_and_waited_on(cfg, caplog):
    client = FakeTrainingClient(
        [_job(("Running", "True")), _job(("Running", "True")), _job(("Succeeded", "True"))],
        pods=[_pod("p-master-0", "Failed", "Evicted")],
    )
    with caplog.at_level("WARNING"):
        run_pytorchjob(cfg, "mar", client=client, poll_s=0)  # the operator recreated the pod
    assert client.deleted == []
    assert caplog.text.count("p-master-0 was evicted") == 1  # reported once, not every poll


def test_long_pending_is_waited_on_then_reported_and_the_job_kept(cfg, caplog):
    client = FakeTrainingClient([_job(("Created", "True"))], pods=[_pod("p-master-0", "Pending")])
    with caplog.at_level("WARNING"), pytest.raises(LaunchError, match="still Pending") as err:
        run_pytorchjob(
            cfg, "mar", client=client, poll_s=0.01, pending_grace_s=0.02, pending_budget_s=0.1
        )
    assert "Pending after" in caplog.text and "waiting" in caplog.text  # told before giving up
    assert "a rerun reattaches" in str(err.value)
    assert client.deleted == []
    client = FakeTrainingClient([_job(("Running", "True"))])
    with pytest.raises(LaunchError, match="timed out"):
        run_pytorchjob(cfg, "mar", client=client, poll_s=0.01, timeout_s=0.05)
    assert client.deleted == []


def test_the_flows_cancellation_leaves_the_job_unless_told(cfg, caplog):
    client = FakeTrainingClient([_job(("Running", "True"))], interrupt_after=2)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        run_pytorchjob(cfg, "mar", client=client, poll_s=0)
    assert client.deleted == [] and "keeps running" in caplog.text
    client = FakeTrainingClient([_job(("Running", "True"))], interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_pytorchjob(cfg, "mar", client=client, poll_s=0, delete_on_cancel=True)
    assert client.deleted == ["paper-mar"]


def test_a_rerun_reattaches_to_the_running_job(cfg):
    client = FakeTrainingClient(
        [_job(("Running", "True")), _job(("Succeeded", "True"))], existing={"paper-mar": None}
    )
    run_pytorchjob(cfg, "mar", client=client, poll_s=0)
    assert client.created == []  # nothing duplicated: the earlier run's job was waited on
    assert client.polls == 2


@pytest.mark.parametrize("ended", ["Failed", "Succeeded"])
def test_a_finished_attempt_is_kept_and_the_next_one_created(cfg, ended):
    """A failed job, or a succeeded one whose export the flow found missing or of another
    config (it looks before launching), is kept for inspection, not waited on again."""
    client = FakeTrainingClient(
        [_job(("Succeeded", "True"))], existing={"paper-mar": _job((ended, "True"))}
    )
    run_pytorchjob(cfg, "mar", client=client, poll_s=0)
    assert [job.metadata.name for job, _ in client.created] == ["paper-mar-a2"]
    assert client.deleted == []
    failed = _job(("Failed", "True"))
    existing = {"paper-mar": failed, **{f"paper-mar-a{n}": failed for n in range(2, 4)}}
    client = FakeTrainingClient([_job(("Running", "True"))], existing=existing)
    with pytest.raises(LaunchError, match="3 attempts .* finished") as err:
        run_pytorchjob(cfg, "mar", client=client, poll_s=0, max_attempts=3)
    assert "delete pytorchjob -l mardini.io/curriculum=paper,mardini.io/stage=mar" in str(err.value)


def test_a_job_queued_by_kueue_is_reported_once_and_waited_on(cfg, caplog):
    queued = _job(("Created", "True"), ("Suspended", "True"))
    client = FakeTrainingClient(
        [queued, queued, _job(("Running", "True")), _job(("Succeeded", "True"))]
    )
    with caplog.at_level("INFO"):
        run_pytorchjob(cfg, "mar", client=client, poll_s=0)
    assert caplog.text.count("is suspended (queued by Kueue?)") == 1
    assert client.polls == 4 and client.deleted == []
