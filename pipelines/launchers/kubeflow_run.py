"""Submit a stage's PyTorchJob with the Kubeflow ``TrainingClient`` and wait for it.

``build_pytorchjob`` (pure) makes the object; this module talks to the cluster: create the job,
poll its conditions until Succeeded or Failed (or the timeout), watch for pods stuck in Pending
or evicted, surface the failing pod's last log lines, and delete the job when the wait is
cancelled or times out so no GPUs stay held.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mardini.config import CurriculumConfig
from pipelines.launchers.kubeflow import LaunchConfig, build_pytorchjob
from pipelines.launchers.local import LaunchError

log = logging.getLogger(__name__)

KIND = "PyTorchJob"
TAIL_LINES = 40


def _conditions(job: Any) -> dict[str, str]:
    """``{type: status}`` of a job's status conditions."""
    status = getattr(job, "status", None)
    return {c.type: c.status for c in (getattr(status, "conditions", None) or [])}


def _pod_problems(
    client: Any, name: str, namespace: str, pending_grace_s: float, seen: dict
) -> str | None:
    """A reason to give up on the job: an evicted pod, or one Pending for too long."""
    now = time.monotonic()
    for pod in client.get_job_pods(name, namespace=namespace):
        phase = pod.status.phase if pod.status else None
        pod_name = pod.metadata.name
        if phase == "Failed" and (pod.status.reason or "") == "Evicted":
            return f"pod {pod_name} was evicted: {pod.status.message or ''}".strip()
        if phase == "Pending":
            first = seen.setdefault(pod_name, now)
            if now - first > pending_grace_s:
                return f"pod {pod_name} is still Pending after {pending_grace_s:.0f} s (no node fits its requests?)"
        else:
            seen.pop(pod_name, None)
    return None


def _log_tail(client: Any, name: str, namespace: str) -> list[str]:
    """The last lines of every replica's log (master first), prefixed with the pod name."""
    try:
        logs, _ = client.get_job_logs(name, namespace=namespace, is_master=False)
    except Exception as err:  # logs are best effort: the pods may be gone
        return [f"(could not read pod logs: {err})"]
    tail = []
    for pod, text in sorted(logs.items(), key=lambda kv: ("master" not in kv[0], kv[0])):
        tail += [f"[{pod}] {line}" for line in text.splitlines()[-TAIL_LINES:]]
    return tail


def run_pytorchjob(
    cfg: CurriculumConfig,
    stage: str,
    *,
    config_path: str | None = None,
    image: str | None = None,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    run_id: str | None = None,
    timeout_s: float | None = None,
    pending_grace_s: float = 1800.0,
    poll_s: float = 15.0,
    client: Any = None,
    launch: LaunchConfig | None = None,
) -> None:
    """Create the stage's PyTorchJob, wait until it succeeds; raise ``LaunchError`` otherwise."""
    from kubeflow.training import TrainingClient

    overrides: dict[str, Any] = {"nnodes": nnodes, "nproc_per_node": nproc_per_node}
    if image:
        overrides["image"] = image
    launch = launch or LaunchConfig.from_env(os.environ)
    job = build_pytorchjob(
        cfg, stage, run_id=run_id, config_path=config_path, launch=launch, **overrides
    )
    name, namespace = job.metadata.name, job.metadata.namespace
    client = client or TrainingClient(namespace=namespace, job_kind=KIND)
    client.create_job(job=job, namespace=namespace)
    log.info("submitted %s %s/%s", KIND, namespace, name)
    start, pending = time.monotonic(), {}
    finished = False
    try:
        while True:
            conditions = _conditions(client.get_job(name, namespace=namespace, job_kind=KIND))
            if conditions.get("Succeeded") == "True":
                finished = True
                log.info("%s %s succeeded after %.0f s", KIND, name, time.monotonic() - start)
                return
            if conditions.get("Failed") == "True":
                finished = True
                raise LaunchError(
                    f"{KIND} {namespace}/{name} failed", _log_tail(client, name, namespace)
                )
            problem = _pod_problems(client, name, namespace, pending_grace_s, pending)
            if problem:
                raise LaunchError(
                    f"{KIND} {namespace}/{name}: {problem}", _log_tail(client, name, namespace)
                )
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise LaunchError(f"{KIND} {namespace}/{name} timed out after {timeout_s:.0f} s",
                                  _log_tail(client, name, namespace))  # fmt: skip
            time.sleep(poll_s)
    finally:
        if not finished:
            # Cancelled, timed out, evicted or stuck: free the cluster; checkpoints stay in the store.
            log.warning("deleting %s %s/%s", KIND, namespace, name)
            try:
                client.delete_job(name, namespace=namespace, job_kind=KIND)
            except Exception as err:
                log.error("could not delete %s %s/%s: %s", KIND, namespace, name, err)
