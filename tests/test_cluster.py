"""Live-cluster check of the Kubeflow launcher; runs only where KUBECONFIG points at a cluster
with the training operator (v1 API), the `mardini` namespace and the image in MARDINI_K8S_IMAGE."""

from __future__ import annotations

import os
from typing import Any

import pytest

from mardini.config import load_config
from pipelines.launchers.kubeflow import KIND, run_pytorchjob
from pipelines.launchers.pytorchjob import LaunchConfig, job_name
from tests.conftest import CONFIGS

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="needs KUBECONFIG (a live cluster)"
    ),
]


def launched_job(client: Any, namespace: str, curriculum: str, stage: str) -> Any:
    """The stage's job the launcher last waited on: attempts are created in order, each only
    once the one before has finished, so it is the highest attempt that exists."""
    names = {job.metadata.name for job in client.list_jobs(namespace, job_kind=KIND)}
    attempts = [a for a in range(1, 6) if job_name(curriculum, stage, a) in names]
    assert attempts, f"no {KIND} of {curriculum}/{stage} in namespace {namespace}"
    return client.get_job(job_name(curriculum, stage, attempts[-1]), namespace, job_kind=KIND)


def assert_succeeded_on(job: Any, workers: int) -> None:
    """The job's status says it succeeded, with every one of ``workers`` Worker pods."""
    conditions = {c.type: c.status for c in job.status.conditions or []}
    assert conditions.get("Succeeded") == "True", conditions
    worker = (job.status.replica_statuses or {}).get("Worker")
    assert worker is not None and worker.succeeded == workers, job.status.replica_statuses


def test_tiny_mar_stage_runs_as_a_pytorchjob():
    """Two CPU pods (elastic Workers, one rank each) train the tiny `mar` stage: the launcher
    returns (it raises with the pod logs otherwise) and the job's status says both pods
    succeeded."""
    from kubeflow.training import TrainingClient

    cfg = load_config(CONFIGS / "tiny.yaml")
    namespace = LaunchConfig.from_env(os.environ).namespace
    client = TrainingClient(namespace=namespace, job_kind=KIND)
    run_pytorchjob(cfg, "mar", nnodes=2, nproc_per_node=1, timeout_s=1800, poll_s=10, client=client)
    assert_succeeded_on(launched_job(client, namespace, cfg.name, "mar"), workers=2)
