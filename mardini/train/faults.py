"""Fault injection for the crash/resume tests: kill a rank at a named point of training."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def fault_point(point: str) -> None:
    """Test hook: ``MARDINI_FAULT=<point>:<rank>`` SIGKILLs that rank at that point (e.g.
    ``after-upload:step-4:1``, ``step:3:0``); used by the crash/resume tests.
    ``MARDINI_FAULT_SIGNAL=TERM`` sends SIGTERM instead (a pod being stopped). The fault is one
    event: a worker group that torchrun restarted (``TORCHELASTIC_RESTART_COUNT`` > 0) runs on."""
    spec = os.environ.get("MARDINI_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    want, _, rank = spec.rpartition(":")
    if want == point and rank == os.environ.get("RANK", "0"):
        import signal

        sig = getattr(signal, f"SIG{os.environ.get('MARDINI_FAULT_SIGNAL', 'KILL')}")
        log.warning("fault injection: %s to rank %s at %s", sig.name, rank, point)
        os.kill(os.getpid(), sig)
