"""Progress of a curriculum as log records: the trainer's step line, its parser, stage events.

The trainer runs in other processes (torchrun ranks) and reports a step as one log line
(``step_line``); a launcher reads those lines back (``parse_step``) and re-emits them, beside
the flow's own stage events (evaluating, gate report, promoted, skipped), as records of the
``mardini.progress`` logger that carry a ``StageEvent``. The CLI draws them as one line per
stage; the records also reach every other handler (the log file) as plain messages.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

LOGGER = "mardini.progress"
# The attribute of a log record that holds its StageEvent.
EVENT_ATTR = "stage_event"

Phase = Literal["train", "evaluate", "gates", "approval", "promoted", "skipped"]

_STEP = re.compile(
    r"stage (?P<stage>\S+) step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>[-+0-9.eE]+|nan|inf)"
)


@dataclass(frozen=True)
class StageEvent:
    """One thing that happened to a stage: a training step, a phase change, a gate report."""

    stage: str
    phase: Phase
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    # The gate report (phase "gates") or what was promoted or skipped.
    text: str = ""
    passed: bool | None = None

    def describe(self) -> str:
        """The event as one plain line."""
        if self.phase == "train" and self.step is not None:
            loss = "" if self.loss is None else f" loss {self.loss:.4f}"
            return f"stage {self.stage}: step {self.step}/{self.total}{loss}"
        if self.phase == "gates":
            return f"stage {self.stage}: {self.text}"
        return f"stage {self.stage}: {self.phase}" + (f" {self.text}" if self.text else "")


def step_line(stage: str, step: int, total: int, loss: float) -> str:
    """The line the trainer logs for a step; ``parse_step`` reads it back."""
    return f"stage {stage} step {step}/{total} loss {loss:.5f}"


def parse_step(line: str) -> StageEvent | None:
    """The training step a log line reports (anywhere in the line), else None."""
    match = _STEP.search(line)
    if match is None:
        return None
    return StageEvent(
        stage=match["stage"],
        phase="train",
        step=int(match["step"]),
        total=int(match["total"]),
        loss=float(match["loss"]),
    )


def emit(event: StageEvent) -> None:
    """Log ``event`` on the progress logger (its record carries the event itself)."""
    logging.getLogger(LOGGER).info("%s", event.describe(), extra={EVENT_ATTR: event})


def event_of(record: logging.LogRecord) -> StageEvent | None:
    """The StageEvent a log record carries, if any."""
    event = getattr(record, EVENT_ATTR, None)
    return event if isinstance(event, StageEvent) else None
