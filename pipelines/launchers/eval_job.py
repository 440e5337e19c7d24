"""A stage's evaluation where the GPUs are: a Kubernetes Job from the training image, or locally
a subprocess running the same command (``python -m mardini.eval.job``, see its docstring).

The flow only submits, waits and reads ``eval.json`` back from the store. Each evaluation is
keyed by what its results depend on (``mardini.eval.job.eval_key``), and so is the Job's name:
a rerun of the flow finds the results of a finished evaluation and runs nothing, and reattaches
to an evaluation Job that is still running.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Any

from mardini.config import CurriculumConfig
from pipelines.launchers.kubeflow import (
    KUEUE_QUEUE_LABEL,
    LaunchConfig,
    _dns_label,
    _pod_spec,
    job_labels,
)
from pipelines.launchers.local import LaunchError

log = logging.getLogger(__name__)

TAIL_LINES = 60


def eval_command(
    config_path: str, stage: str, export: str, out: str, data: str, run_id: str | None
) -> list[str]:
    """The command an evaluation runs, locally and in its Job."""
    words = ["python", "-m", "mardini.eval.job", "--config", config_path, "--stage", stage]
    words += ["--export", export, "--out", out, "--data", data]
    return words + (["--run-id", run_id] if run_id else [])


def run_eval_local(command: list[str], env: dict[str, str], timeout_s: float | None = None) -> None:
    """Run ``command`` as a subprocess of this Python; ``LaunchError`` with its last lines."""
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
            f"evaluation timed out after {timeout_s:.0f} s: {' '.join(argv)}",
            tail.splitlines()[-TAIL_LINES:],
        ) from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).splitlines()[-TAIL_LINES:]
        raise LaunchError(f"evaluation failed (exit {done.returncode}): {' '.join(argv)}", tail)
    log.info("evaluation finished in %.0f s", time.monotonic() - start)


def eval_job_name(curriculum: str, stage: str, key: str) -> str:
    """``{curriculum}-{stage}-eval-{key}``, a DNS label (63 characters at most)."""
    return f"{_dns_label(f'{curriculum}-{stage}', max_len=63 - 6 - len(key[:8]))}-eval-{key[:8]}"


def build_eval_job(
    cfg: CurriculumConfig,
    stage: str,
    command: list[str],
    key: str,
    run_id: str | None = None,
    launch: LaunchConfig | None = None,
) -> Any:
    """The ``batch/v1`` Job of one evaluation: the training pod's spec (image, secrets, store,
    MLflow, security, node placement) with one GPU when the training pods have any."""
    from kubernetes.client import V1Job, V1JobSpec, V1ObjectMeta, V1PodTemplateSpec

    lc = launch or LaunchConfig.from_env(os.environ)
    lc = lc.model_copy(update={"gpus_per_node": min(lc.gpus_per_node, 1), "nproc_per_node": None})
    labels = {**job_labels(cfg, stage, run_id), "app.kubernetes.io/component": "evaluation"}
    pod = _pod_spec(lc, command)
    pod.restart_policy = "Never"  # a failed evaluation is retried as a new pod (backoffLimit)
    # Queued like the training jobs (on the Job only: Kueue admits workloads, not pods).
    queue = {KUEUE_QUEUE_LABEL: lc.kueue_queue} if lc.kueue_queue else {}
    return V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=V1ObjectMeta(
            name=eval_job_name(cfg.name, stage, key),
            namespace=lc.namespace,
            labels={**labels, **queue},
        ),
        spec=V1JobSpec(
            backoff_limit=lc.backoff_limit,
            ttl_seconds_after_finished=lc.ttl_seconds_after_finished,
            active_deadline_seconds=lc.active_deadline_seconds,
            template=V1PodTemplateSpec(metadata=V1ObjectMeta(labels=labels), spec=pod),
        ),
    )


def _kubernetes_apis() -> tuple[Any, Any]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.BatchV1Api(), client.CoreV1Api()


def run_eval_job(
    job: Any,
    timeout_s: float | None = None,
    poll_s: float = 10.0,
    apis: tuple[Any, Any] | None = None,
) -> None:
    """Create the evaluation Job (or reattach to it when it exists) and wait until it succeeds;
    ``LaunchError`` with its pods' last log lines when it fails or times out. A Job left
    behind by a timeout keeps running: a rerun reattaches to it."""
    from kubernetes.client.exceptions import ApiException

    batch, core = apis or _kubernetes_apis()
    name, namespace = job.metadata.name, job.metadata.namespace
    try:
        batch.create_namespaced_job(namespace, job)
        log.info("created evaluation Job %s/%s", namespace, name)
    except ApiException as err:
        if err.status != 409:
            raise
        log.info("evaluation Job %s/%s exists: waiting for it", namespace, name)
    start = time.monotonic()
    while True:
        status = batch.read_namespaced_job(name, namespace).status
        conditions = {c.type: c.status for c in (status.conditions or [])}
        if (status.succeeded or 0) >= 1 or conditions.get("Complete") == "True":
            log.info("evaluation Job %s/%s succeeded", namespace, name)
            return
        if conditions.get("Failed") == "True":
            raise LaunchError(f"evaluation Job {namespace}/{name} failed", _tail(core, job))
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise LaunchError(
                f"evaluation Job {namespace}/{name} timed out after {timeout_s:.0f} s; it keeps "
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
