"""Run a stage on this machine exactly as the Kubeflow operator would run it in a cluster.

``nnodes`` "nodes" are started as local processes, each running the launch contract's command
with the variables the training operator sets on a replica of an elastic job (``PET_*``: a
c10d rendezvous, the node count, ``--max-restarts``). Their output is streamed to the log with a node
prefix (the trainer's step lines also as ``mardini.progress`` events); when one node fails,
every other node's process group is torn down, and the error carries the failing node's last
log lines.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mardini.progress import StageEvent, emit, parse_step
from pipelines.launchers.contract import ELASTIC_ENV, LaunchError, contract_words

log = logging.getLogger(__name__)

# How long the launcher waits for a finished node's remaining output lines.
PUMP_JOIN_S = 5.0

# torchrun restarts a failed worker group this often before the launch fails. Locally a rank
# that dies is more often a bug than a lost machine, so once; PyTorchJobs take
# LaunchConfig.max_restarts.
DEFAULT_MAX_RESTARTS = 1

TAIL_LINES = 80  # torchrun's own failure report takes about 35 of them


@dataclass
class LocalResult:
    """A finished local job."""

    seconds: float
    logs: list[str]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_env(
    nnodes: int, nproc: int, port: int, run_id: str, max_restarts: int = 0
) -> dict[str, str]:
    """The variables the Kubeflow training operator sets on a replica of an elastic job: the
    rendezvous (c10d at ``127.0.0.1:port``, hosted by the first node's agent), the node count
    as ``N:N`` and how often torchrun may restart the worker group."""
    return {
        "PET_NNODES": f"{nnodes}:{nnodes}",
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "PET_RDZV_ID": run_id,
        "PET_MAX_RESTARTS": str(max_restarts),
    }


def node_command(config_path: str, stage: str, env: dict[str, str]) -> list[str]:
    """The contract's words with ``$PET_*`` expanded and ``torchrun`` resolved in this venv."""
    words = [env[w[1:]] if w.startswith("$") else w for w in contract_words(config_path, stage)]
    torchrun = Path(sys.executable).with_name("torchrun")
    words[0] = str(torchrun) if torchrun.exists() else words[0]
    return words


def run_local(
    config_path: str,
    stage: str,
    *,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    cwd: str | None = None,
    on_step: Callable[[StageEvent], None] | None = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> LocalResult:
    """Run the stage's job to completion; raise ``LaunchError`` with the failing node's log tail.

    A rank that dies makes torchrun restart the worker group, up to ``max_restarts`` times,
    from the stage's latest checkpoint (as in a PyTorchJob); the launcher fails only when a
    node's torchrun gives up. ``on_step`` sees every training step event, called from this
    (the caller's) thread."""
    port = free_port()
    run_id = f"{stage}-{port}"  # one rendezvous per launch
    base = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    base.update(ELASTIC_ENV)
    # Each rank's share of this machine's cores, read when the rank imports torch. Left unset,
    # torchrun sets 1 itself and prints a banner saying so.
    ranks = nnodes * nproc_per_node
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    procs: list[subprocess.Popen] = []
    tails: list[collections.deque] = []
    logs: list[str] = []
    lock = threading.Lock()
    steps: queue.Queue[StageEvent] = queue.Queue()
    pumps: list[threading.Thread] = []

    def finish_pumps() -> None:
        # A pump ends at its node's end of output; a lingering grandchild holding the pipe
        # open must not hold the launcher, hence the bound.
        for pump_thread in pumps:
            pump_thread.join(timeout=PUMP_JOIN_S)

    def pump(node: int, proc: subprocess.Popen, tail: collections.deque) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            tail.append(line)
            with lock:
                logs.append(f"[node {node}] {line}")
            event = relay_line(stage, node, line)
            if event is not None and on_step is not None:
                steps.put(event)

    start = time.monotonic()
    try:
        for node in range(nnodes):
            node_env = {**base, **operator_env(nnodes, nproc_per_node, port, run_id, max_restarts)}
            cmd = node_command(config_path, stage, node_env)
            log.info("launching %s node %d/%d: %s", stage, node, nnodes, " ".join(cmd))
            proc = subprocess.Popen(
                cmd, env=node_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True,  # its own process group: we can kill all ranks
            )  # fmt: skip
            tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
            pumps.append(threading.Thread(target=pump, args=(node, proc, tail), daemon=True))
            pumps[-1].start()
            procs.append(proc)
            tails.append(tail)
        while True:
            _drain(steps, on_step)
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                node = failed[0]
                _teardown(procs)
                finish_pumps()  # the failing node's last lines belong in the error
                raise LaunchError(
                    f"stage {stage!r}: node {node} exited with code {codes[node]}"
                    + _failing_rank(tails[node]),
                    list(tails[node]),
                )
            if all(c == 0 for c in codes):
                finish_pumps()  # the final step line
                _drain(steps, on_step)
                return LocalResult(time.monotonic() - start, logs)
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                _teardown(procs)
                raise LaunchError(
                    f"stage {stage!r}: timed out after {timeout_s:.0f} s", list(tails[0])
                )
            time.sleep(0.2)
    except BaseException:
        _teardown(procs)  # cancellation (KeyboardInterrupt, Prefect cancel) too: no orphans
        raise


def relay_line(stage: str, node: int, line: str) -> StageEvent | None:
    """Log one line of a node's output; a training step line also becomes a progress event,
    which is returned."""
    log.info("[%s node %d] %s", stage, node, line)
    event = parse_step(line)
    if event is not None:
        emit(event)
    return event


def _drain(steps: queue.Queue, on_step: Callable[[StageEvent], None] | None) -> None:
    """Hand the step events the pump threads queued to ``on_step``, in order."""
    while on_step is not None:
        try:
            on_step(steps.get_nowait())
        except queue.Empty:
            return


def _failing_rank(tail: collections.deque) -> str:
    """torchrun's summary names the first failed rank; surface it in the message."""
    for line in tail:
        if "rank" in line and ("local_rank" in line or "Root Cause" in line):
            return f" ({line.strip()})"
    return ""


def _teardown(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every node's process group, then SIGKILL what is left after ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)  # the group may outlive its leader
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
