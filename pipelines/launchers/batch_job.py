"""Heavy steps besides training (a stage's evaluation, the latent cache) where the GPUs are: a
Kubernetes ``batch/v1`` Job from the training image, or locally a subprocess running the same
command. The flow only submits, waits and reads the step's results back from the store.

A Job's name is deterministic per piece of work (the caller keys it), so a rerun of the flow
reattaches to a Job that is still running (409 on create) instead of starting another. A Job of
``parts > 1`` is an Indexed Job: pod ``i`` gets ``JOB_COMPLETION_INDEX=i`` and does its share.
Waiting needs only ``get`` on Jobs (the flow-run account's Role already has it); log tails need
``list``/``get`` on pods and their logs, and are a bonus when they cannot be read.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

from mardini.config import CurriculumConfig
from pipelines.launchers.contract import LaunchError
from pipelines.launchers.pytorchjob import KUEUE_QUEUE_LABEL, LaunchConfig, job_labels, pod_spec

log = logging.getLogger(__name__)

TAIL_LINES = 60


def run_local(
    command: list[str], env: dict[str, str], timeout_s: float | None = None, what: str = "step"
) -> None:
    """Run ``command`` (``python ...``) with this Python; ``LaunchError`` with its last lines."""
    argv = [sys.executable, *command[1:]]
    start = time.monotonic()
    try:
        done = subprocess.run(
            argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as err:
        output = err.stderr or b""  # bytes even under text=True
        tail = output.decode(errors="replace") if isinstance(output, bytes) else output
        raise LaunchError(
            f"{what} timed out after {timeout_s:.0f} s: {' '.join(argv)}",
            tail.splitlines()[-TAIL_LINES:],
        ) from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).splitlines()[-TAIL_LINES:]
        raise LaunchError(f"{what} failed (exit {done.returncode}): {' '.join(argv)}", tail)
    log.info("%s finished in %.0f s", what, time.monotonic() - start)


def build_job(
    cfg: CurriculumConfig,
    stage: str,
    command: list[str],
    name: str,
    component: str,
    run_id: str | None = None,
    launch: LaunchConfig | None = None,
    parts: int = 1,
) -> Any:
    """A ``batch/v1`` Job running ``command``: the training pod's spec (image, secrets, store,
    MLflow, security, node placement) with one GPU per pod when the training pods have any;
    ``parts`` pods at once as an Indexed Job when ``parts > 1``."""
    from kubernetes.client import V1Job, V1JobSpec, V1ObjectMeta, V1PodTemplateSpec

    lc = one_gpu_share(launch or LaunchConfig.from_env(os.environ))
    labels = {**job_labels(cfg, stage, run_id), "app.kubernetes.io/component": component}
    pod = pod_spec(lc, command)
    pod.restart_policy = "Never"  # a failed pod is retried as a new pod (backoffLimit)
    # Queued like the training jobs (on the Job only: Kueue admits workloads, not pods).
    queue = {KUEUE_QUEUE_LABEL: lc.kueue_queue} if lc.kueue_queue else {}
    indexed = (
        {"completion_mode": "Indexed", "completions": parts, "parallelism": parts}
        if parts > 1
        else {}
    )
    return V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=V1ObjectMeta(name=name, namespace=lc.namespace, labels={**labels, **queue}),
        spec=V1JobSpec(
            backoff_limit=lc.backoff_limit * parts,
            ttl_seconds_after_finished=lc.ttl_seconds_after_finished,
            active_deadline_seconds=lc.active_deadline_seconds,
            template=V1PodTemplateSpec(metadata=V1ObjectMeta(labels=labels), spec=pod),
            **indexed,
        ),
    )


def one_gpu_share(lc: LaunchConfig) -> LaunchConfig:
    """The launch settings of a one-GPU pod: a training node's CPU, memory and /dev/shm divided by
    its GPUs, so that eight one-GPU pods fit where one eight-GPU training pod fits."""
    from kubernetes.utils import parse_quantity

    share = max(lc.gpus_per_node, 1)
    mib = lambda q: f"{max(1, int(parse_quantity(q) / share / 2**20))}Mi"  # noqa: E731
    return lc.model_copy(
        update={
            "gpus_per_node": min(lc.gpus_per_node, 1),
            "nproc_per_node": None,
            "cpu": f"{max(1, int(parse_quantity(lc.cpu) * 1000 / share))}m",
            "memory": mib(lc.memory),
            "shm_size": mib(lc.shm_size),
        }
    )


def _kubernetes_apis() -> tuple[Any, Any]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.BatchV1Api(), client.CoreV1Api()


def run_job(
    job: Any,
    timeout_s: float | None = None,
    poll_s: float = 10.0,
    apis: tuple[Any, Any] | None = None,
    what: str = "Job",
) -> None:
    """Create ``job`` (or reattach to it when it exists) and wait until every part succeeded;
    ``LaunchError`` with its pods' last log lines when it fails or times out. A Job left behind
    by a timeout keeps running: a rerun reattaches to it."""
    from kubernetes.client.exceptions import ApiException

    batch, core = apis or _kubernetes_apis()
    name, namespace = job.metadata.name, job.metadata.namespace
    parts = job.spec.completions or 1
    try:
        batch.create_namespaced_job(namespace, job)
        log.info("created %s Job %s/%s", what, namespace, name)
    except ApiException as err:
        if err.status != 409:
            raise
        log.info("%s Job %s/%s exists: waiting for it", what, namespace, name)
    start = time.monotonic()
    while True:
        status = batch.read_namespaced_job(name, namespace).status
        conditions = {c.type: c.status for c in (status.conditions or [])}
        if (status.succeeded or 0) >= parts or conditions.get("Complete") == "True":
            log.info("%s Job %s/%s succeeded", what, namespace, name)
            return
        if conditions.get("Failed") == "True":
            raise LaunchError(f"{what} Job {namespace}/{name} failed", _tail(core, job))
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise LaunchError(
                f"{what} Job {namespace}/{name} timed out after {timeout_s:.0f} s; it keeps "
                "running (a rerun reattaches to it)",
                _tail(core, job),
            )
        time.sleep(poll_s)


def _tail(core: Any, job: Any) -> list[str]:
    """The last log lines of the Job's pods (what there is; never raises)."""
    name, namespace = job.metadata.name, job.metadata.namespace
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        lines = []
        for pod in pods:
            text = core.read_namespaced_pod_log(pod.metadata.name, namespace) or ""
            lines += [f"[{pod.metadata.name}] {line}" for line in text.splitlines()[-TAIL_LINES:]]
        return lines
    except Exception as err:  # the failure is the news; its logs are a bonus
        return [f"(could not read pod logs: {err})"]
