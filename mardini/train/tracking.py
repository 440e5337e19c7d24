"""MLflow tracking from rank 0: resolved config as params, metrics, artifacts, tags; sent by a
background thread that retries a failing server, so tracking never stalls or kills training.

Where it tracks to and how clients are made: ``mardini.mlflow_setup``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from mardini.mlflow_setup import ensure_experiment, flatten, tracking_uri

log = logging.getLogger(__name__)


def git_commit() -> str:
    """The source tree's git commit, or ``unknown`` (in a container without .git)."""
    env = os.environ.get("MARDINI_GIT_COMMIT")
    if env:
        return env
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except Exception:
        return "unknown"


class Tracker:
    """The stage's MLflow run, from rank 0; every method is a no-op on other ranks.

    Training never waits on MLflow and never dies of it. ``start`` talks to the server (the
    run id goes into every checkpoint, so a stage cannot start without one); after that,
    params, metrics, artifacts and the run's end are queued and sent by one background thread,
    in order, consecutive metrics in batches. A failing server is retried with exponential
    backoff (``backoff_s`` doubling up to ``max_backoff_s``, the way composer retries object
    stores); what has failed for ``give_up_s`` is dropped with a warning and training goes on
    (the loss is also in the trainer's log). MLflow's own HTTP retries run inside that thread
    too, so an outage costs the step nothing. ``end`` waits at most ``flush_timeout_s`` for the
    queue to drain. At most ``max_queued`` items wait; beyond that the newest are dropped, counted.
    """

    def __init__(
        self,
        enabled: bool,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        give_up_s: float = 600.0,
        flush_timeout_s: float = 120.0,
        max_queued: int = 10_000,
    ):
        self.enabled = enabled
        self.run_id: str | None = None
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.give_up_s, self.flush_timeout_s, self.max_queued = (
            give_up_s,
            flush_timeout_s,
            max_queued,
        )
        self.dropped = 0  # items given up on or not queued (read after ``end``)
        self._client: Any = None
        self._uri = ""
        self._queue: deque[tuple[str, Any]] = deque()
        self._ready = threading.Condition()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._spool: str | None = None  # copies of artifacts waiting to be sent

    def start(
        self,
        experiment: str,
        run_name: str,
        store: str,
        tags: dict[str, str],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Start (or resume, given ``run_id``) the stage's run; nests under ``parent_run_id``."""
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient

        self._uri = tracking_uri(store)
        self._client = MlflowClient(self._uri)
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        if run_id:
            self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            experiment_id = ensure_experiment(experiment, store, self._uri)
            run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        self._spool = tempfile.mkdtemp(prefix="mardini-tracking-")
        self._thread = threading.Thread(target=self._send_all, name="mlflow-tracker", daemon=True)
        self._thread.start()
        return self.run_id

    def params(self, params: dict[str, Any]) -> None:
        """Log flattened params (batched; values already logged are skipped on resume)."""
        if self.enabled:
            self._put("params", flatten(params))

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log metrics at ``step`` (queued: returns at once)."""
        if self.enabled:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._put("metrics", [Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Upload a local file as an artifact (a copy is queued: the file may go at once)."""
        if self.enabled:
            copy = Path(tempfile.mkdtemp(dir=self._spool)) / Path(path).name
            shutil.copyfile(path, copy)
            self._put("artifact", (copy, folder))

    def end(self, status: str = "FINISHED") -> None:
        """End the run: send what is queued (within ``flush_timeout_s``), then the status."""
        if not (self.enabled and self._thread):
            return
        self._put("end", status)
        self._closing.set()
        with self._ready:
            self._ready.notify()
        self._thread.join(self.flush_timeout_s)
        if self._thread.is_alive():
            with self._ready:  # the thread may still be taking items
                left = len(self._queue)
            self.dropped += left
            log.warning(
                "tracking: MLflow at %s did not take the last %d items within %.0f s; the run "
                "stays as it is there (training is not affected)",
                self._uri,
                left,
                self.flush_timeout_s,
            )
        else:
            shutil.rmtree(self._spool, ignore_errors=True)
        if self.dropped:
            log.warning(
                "tracking: %d items were not logged to MLflow run %s", self.dropped, self.run_id
            )

    # ------------------------------------------------------------------ the sending thread

    def _put(self, kind: str, payload: Any) -> None:
        with self._ready:
            if len(self._queue) >= self.max_queued:
                self.dropped += 1
                return
            self._queue.append((kind, payload))
            self._ready.notify()

    def _next(self) -> tuple[str, Any] | None:
        """The next item; consecutive metric items merge into one batch (MLflow: 1000 a call)."""
        with self._ready:
            while not self._queue:
                if self._closing.is_set():
                    return None
                self._ready.wait()
            kind, payload = self._queue.popleft()
            if kind == "metrics":
                while self._queue and self._queue[0][0] == "metrics":
                    if len(payload) + len(self._queue[0][1]) > 1000:
                        break
                    payload = payload + self._queue.popleft()[1]
            return kind, payload

    def _send_all(self) -> None:
        while (item := self._next()) is not None:
            kind, payload = item
            self._send_with_retry(kind, payload)
            if kind == "end":
                return

    def _send_with_retry(self, kind: str, payload: Any) -> None:
        delay, first_failure, warned = self.backoff_s, None, False
        while True:
            try:
                self._send(kind, payload)
                if warned:
                    log.warning("tracking: MLflow at %s answers again", self._uri)
                return
            except Exception as exc:  # any failure of the server or the network: never raised
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                if now - first_failure >= self.give_up_s:
                    self.dropped += len(payload) if kind == "metrics" else 1
                    log.warning(
                        "tracking: MLflow at %s has failed for %.0f s (%s); %s dropped, "
                        "training goes on",
                        self._uri,
                        now - first_failure,
                        exc,
                        kind,
                    )
                    return
                if not warned:
                    log.warning(
                        "tracking: MLflow at %s failed (%s); training goes on, retrying for up "
                        "to %.0f s",
                        self._uri,
                        exc,
                        self.give_up_s,
                    )
                    warned = True
                time.sleep(delay)
                delay = min(2 * delay, self.max_backoff_s)

    def _send(self, kind: str, payload: Any) -> None:
        from mlflow.entities import Param

        client, run_id = self._client, self.run_id
        if kind == "metrics":
            client.log_batch(run_id, metrics=payload)
        elif kind == "params":
            existing = client.get_run(run_id).data.params
            todo = [Param(k[:250], v) for k, v in payload.items() if k not in existing]
            for i in range(0, len(todo), 100):
                client.log_batch(run_id, params=todo[i : i + 100])
        elif kind == "artifact":
            path, folder = payload
            client.log_artifact(run_id, str(path), artifact_path=folder)
        elif kind == "end":
            client.set_terminated(run_id, status=payload)
        else:
            raise ValueError(f"unknown tracking item {kind!r}")
