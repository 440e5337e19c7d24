"""Submit a stage's PyTorchJob with the Kubeflow ``TrainingClient`` and wait for it.

``build_pytorchjob`` (pure) makes the object; this module talks to the cluster: create the job
or reattach to the one an earlier flow run created (deterministic names per attempt), poll its
conditions until Succeeded or Failed, report evicted and long-Pending pods while waiting,
surface the failing pod's last log lines. The job never depends on the flow run's pod: a flow
that stops waiting leaves it running unless told to delete it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mardini.config import CurriculumConfig
from pipelines.launchers.contract import LaunchError
from pipelines.launchers.pytorchjob import LABEL_PREFIX, LaunchConfig, build_pytorchjob, job_name

log = logging.getLogger(__name__)

KIND = "PyTorchJob"
TAIL_LINES = 40


def _conditions(job: Any) -> dict[str, str]:
    """``{type: status}`` of a job's status conditions."""
    status = getattr(job, "status", None)
    return {c.type: c.status for c in (getattr(status, "conditions", None) or [])}


def _pod_problems(
    client: Any,
    name: str,
    namespace: str,
    pending_grace_s: float,
    pending_budget_s: float,
    seen: dict,
    told: set,
) -> str | None:
    """Report (once each) evicted pods, which the operator recreates, and pods Pending longer
    than ``pending_grace_s``; return a reason to stop waiting once a pod has been Pending for
    ``pending_budget_s``, else None (keep waiting)."""
    now = time.monotonic()
    for pod in client.get_job_pods(name, namespace=namespace):
        phase = pod.status.phase if pod.status else None
        pod_name = pod.metadata.name
        if phase == "Failed" and (pod.status.reason or "") == "Evicted":
            if (pod_name, "evicted") not in told:
                told.add((pod_name, "evicted"))
                log.warning(
                    "pod %s was evicted (%s); the operator recreates it and training resumes "
                    "from its last checkpoint: waiting",
                    pod_name,
                    pod.status.message or "no message",
                )
        if phase == "Pending":
            waited = now - seen.setdefault(pod_name, now)
            if waited > pending_grace_s and (pod_name, "pending") not in told:
                told.add((pod_name, "pending"))
                log.warning(
                    "pod %s is still Pending after %.0f s (no node fits its requests?): waiting",
                    pod_name,
                    waited,
                )
            if waited > pending_budget_s:
                return f"pod {pod_name} is still Pending after {waited:.0f} s"
        else:
            seen.pop(pod_name, None)
    return None


def _is_conflict(err: BaseException) -> bool:
    """Whether creating the job failed because one of that name exists (HTTP 409); the SDK
    wraps the API's exception in a RuntimeError."""
    while err is not None:
        if getattr(err, "status", None) == 409:
            return True
        err = err.__cause__
    return False


def submit(client: Any, job: Any, cfg: CurriculumConfig, stage: str, max_attempts: int) -> str:
    """Create the stage's job, or reattach: names are deterministic per (curriculum, stage,
    attempt), so a job that exists (409) is this stage's. One still running is waited on; a
    finished one is kept for inspection and the next attempt is created. (A finished job's
    result is its ``final/`` export, which the flow reads before launching anything: reaching
    here past a finished job means that export is missing or from another config.)"""
    namespace = job.metadata.namespace
    for attempt in range(1, max_attempts + 1):
        name = job.metadata.name = job_name(cfg.name, stage, attempt)
        try:
            client.create_job(job=job, namespace=namespace)
            log.info("submitted %s %s/%s", KIND, namespace, name)
            return name
        except Exception as err:
            if not _is_conflict(err):
                raise
        state = _conditions(client.get_job(name, namespace=namespace, job_kind=KIND))
        if "True" not in (state.get("Failed"), state.get("Succeeded")):
            log.info("%s %s/%s exists (an earlier flow run's): reattaching", KIND, namespace, name)
            return name
        log.info("%s %s/%s finished before: kept; trying attempt %d", KIND, namespace, name, attempt + 1)  # fmt: skip
    labels = job.metadata.labels
    selector = ",".join(f"{k}={labels[k]}" for k in (f"{LABEL_PREFIX}/curriculum", f"{LABEL_PREFIX}/stage"))  # fmt: skip
    raise LaunchError(
        f"stage {stage!r}: {max_attempts} attempts ({job_name(cfg.name, stage, 1)} ...) exist and "
        f"finished; look at them (kubectl -n {namespace} describe pytorchjob -l {selector}), then "
        f"delete them (kubectl -n {namespace} delete pytorchjob -l {selector}) to start again",
        [],
    )


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
    pending_budget_s: float = 6 * 3600.0,
    poll_s: float = 15.0,
    client: Any = None,
    launch: LaunchConfig | None = None,
    delete_on_cancel: bool | None = None,
    max_attempts: int = 5,
    max_restarts: int | None = None,
) -> None:
    """Create the stage's PyTorchJob (or reattach to it), wait until it succeeds; raise
    ``LaunchError`` otherwise.

    The job outlives the flow run: evictions are reported and waited on (the operator recreates
    the pods), Pending pods are waited on for ``pending_budget_s``, and a timeout or the flow's
    cancellation (SIGTERM) leaves the job running, so a rerun reattaches. Only with
    ``delete_on_cancel`` (default ``$MARDINI_K8S_DELETE_ON_CANCEL``, off) is a job that the
    flow stops waiting for deleted.
    """
    from kubeflow.training import TrainingClient

    overrides: dict[str, Any] = {"nnodes": nnodes, "nproc_per_node": nproc_per_node}
    if image:
        overrides["image"] = image
    if max_restarts is not None:
        overrides["max_restarts"] = max_restarts
    launch = launch or LaunchConfig.from_env(os.environ)
    if delete_on_cancel is None:
        delete_on_cancel = os.environ.get("MARDINI_K8S_DELETE_ON_CANCEL", "").lower() in (
            "1",
            "true",
        )
    job = build_pytorchjob(
        cfg, stage, run_id=run_id, config_path=config_path, launch=launch, **overrides
    )
    namespace = job.metadata.namespace
    client = client or TrainingClient(namespace=namespace, job_kind=KIND)
    name = submit(client, job, cfg, stage, max_attempts)
    start, pending, told = time.monotonic(), {}, set()
    finished = False
    try:
        while True:
            conditions = _conditions(client.get_job(name, namespace=namespace, job_kind=KIND))
            if conditions.get("Suspended") == "True" and "suspended" not in told:
                # Kueue (MARDINI_K8S_KUEUE_QUEUE) holds a job suspended, without pods, until
                # its whole gang fits the queue's quota: that wait is not a problem.
                told.add("suspended")
                log.info(
                    "%s %s/%s is suspended (queued by Kueue?): waiting for admission "
                    "(kubectl -n %s get workloads)",
                    KIND, namespace, name, namespace,
                )  # fmt: skip
            if conditions.get("Succeeded") == "True":
                finished = True
                log.info("%s %s succeeded after %.0f s", KIND, name, time.monotonic() - start)
                return
            if conditions.get("Failed") == "True":
                finished = True
                raise LaunchError(
                    f"{KIND} {namespace}/{name} failed", _log_tail(client, name, namespace)
                )
            problem = _pod_problems(
                client, name, namespace, pending_grace_s, pending_budget_s, pending, told
            )
            if problem:
                raise LaunchError(
                    f"{KIND} {namespace}/{name}: {problem}; the job is kept (a rerun reattaches "
                    f"to it; kubectl -n {namespace} delete pytorchjob {name} gives up on it)",
                    _log_tail(client, name, namespace),
                )
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise LaunchError(f"{KIND} {namespace}/{name} timed out after {timeout_s:.0f} s; "
                                  "the job is kept (a rerun reattaches to it)",
                                  _log_tail(client, name, namespace))  # fmt: skip
            time.sleep(poll_s)
    finally:
        if not finished:
            if delete_on_cancel:
                # Asked for: free the cluster now; checkpoints stay in the store.
                log.warning("deleting %s %s/%s", KIND, namespace, name)
                try:
                    client.delete_job(name, namespace=namespace, job_kind=KIND)
                except Exception as err:
                    log.error("could not delete %s %s/%s: %s", KIND, namespace, name, err)
            else:
                log.warning(
                    "stopped waiting for %s %s/%s; it keeps running (a rerun of the flow "
                    "reattaches to it; kubectl -n %s delete pytorchjob %s stops it)",
                    KIND, namespace, name, namespace, name,
                )  # fmt: skip
