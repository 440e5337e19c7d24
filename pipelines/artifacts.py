"""What a flow run shows in Prefect's UI: a training progress bar and a report per stage.

Keyed artifacts keep their history: a re-run adds a new version under the same key (the
Artifacts page lists every flow run's), so earlier runs' reports stay findable. Every call is
best-effort: without a Prefect API (a flow called as a plain function) it logs and goes on.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from mardini.progress import StageEvent

log = logging.getLogger(__name__)

# Metrics shown beside their baselines: (model metric, nearest-frame, linear-blend).
COMPARED = tuple(
    (name, f"baseline_nearest_{name}", f"baseline_blend_{name}")
    for task in ("interp", "i2v")
    for name in (f"{task}_psnr", f"{task}_ssim", f"fvd_{task}")
)


def artifact_key(prefix: str, stage: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) for ``stage``."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{stage}".lower()).strip("-")
    return slug or prefix


class StageProgress:
    """The progress artifact of a stage's training, updated from its step events at most every
    ``every_s`` seconds (and always at the last step)."""

    def __init__(self, stage: str, total: int, every_s: float = 2.0) -> None:
        self.stage, self.total, self.every_s = stage, max(1, total), every_s
        self._last = 0.0
        self.id: UUID | None = _quiet(
            create_progress_artifact,
            0.0,
            key=artifact_key("progress", stage),
            description=f"stage {stage}: training, step 0/{total}",
        )

    def step(self, event: StageEvent) -> None:
        """Show ``event``'s step (a train event of this stage); throttled."""
        if event.stage != self.stage or event.step is None:
            return
        now = time.monotonic()
        if event.step < self.total and now - self._last < self.every_s:
            return
        self._last = now
        loss = "" if event.loss is None else f", loss {event.loss:.4f}"
        self.set(event.step, f"stage {self.stage}: step {event.step}/{self.total}{loss}")

    def set(self, step: int, description: str) -> None:
        """Show ``step`` of ``total`` with ``description``."""
        if self.id is not None:
            percent = 100.0 * min(step, self.total) / self.total
            _quiet(update_progress_artifact, self.id, percent, description=description)


def stage_markdown(
    stage: str,
    report: str,
    passed: bool,
    metrics: Mapping[str, Any],
    run_link: str,
    version: str | None,
) -> str:
    """The stage's report: verdict, MLflow link, gate report, key metrics beside baselines."""
    verdict = "passed its gates" if passed else "FAILED its gates"
    lines = [f"# Stage `{stage}` {verdict}", "", f"MLflow run: {run_link}", ""]
    if version:
        lines += [f"Model version: {version}", ""]
    lines += ["## Gate report", "", "```", report.strip(), "```", ""]
    rows = [
        (name, *(metrics.get(k) for k in (name, nearest, blend)))
        for name, nearest, blend in COMPARED
        if isinstance(metrics.get(name), int | float)
    ]
    if rows:
        lines += [
            "## Held-out metrics",
            "",
            "| metric | model | nearest | blend |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n} | {_num(m)} | {_num(a)} | {_num(b)} |" for n, m, a, b in rows]
        lines.append("")
    other = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not k.startswith("baseline_")
        and k not in {r[0] for r in rows}
    }  # fmt: skip
    if other:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in sorted(other.items())]
    return "\n".join(lines)


def held_out_summary(metrics: Mapping[str, Any]) -> str:
    """One line per task: the model's held-out PSNR and FVD beside both baselines' (console)."""
    lines = []
    for task, label in (("interp", "interpolation"), ("i2v", "image-to-video")):
        parts = []
        for name, unit, spec in ((f"{task}_psnr", " dB", ".2f"), (f"fvd_{task}", "", ".0f")):
            value = metrics.get(name)
            if not isinstance(value, int | float):
                continue
            bases = [
                f"{base} {metrics[key]:{spec}}"
                for base in ("nearest", "blend")
                if isinstance(metrics.get(key := f"baseline_{base}_{name}"), int | float)
            ]
            metric = "PSNR" if name.endswith("psnr") else "FVD"
            parts.append(f"{metric} {value:{spec}}{unit} ({', '.join(bases)})")
        if parts:
            lines.append(f"  held out, {label}: " + "; ".join(parts))
    floor = metrics.get("fvd_real_halves")
    if lines and isinstance(floor, int | float):
        clips = metrics.get("fvd_clips", "?")
        lines.append(f"  FVD from {clips} clips; real vs real {floor:.0f} (few clips: biased)")
    return "\n".join(lines)


def approval_markdown(
    stage: str,
    version: str,
    run_link: str,
    samples: list[tuple[str, str]],
    flow_run_id: str,
    deadline: str,
) -> str:
    """What a person reads before deciding: where the evidence is and how to answer (the gate
    report and the metrics beside the baselines are the stage's report artifact)."""
    lines = [
        f"# Stage `{stage}`: version {version} waits for your decision",
        "",
        f"It passed its gates (report: artifact `{artifact_key('stage', stage)}`). "
        f"MLflow run: {run_link}",
        "",
    ]
    titles = {"interp.gif": "Interpolation", "i2v.gif": "Image-to-video"}
    for name, url in samples:  # (file name, URL or artifact path)
        # Images render where the picture is served over http (an MLflow tracking server).
        picture = f"![{name}]({url})" if url.startswith("http") else f"`{url}`"
        lines += [f"**{titles.get(name, name)}**", "", picture, ""]
    if samples:
        lines += ["Sample columns: ground truth | nearest | blend | model.", ""]
    lines += [
        "## Decide",
        "",
        "- **Prefect UI**: this flow run's **Resume** button opens the form: `approve` or "
        "`reject`, a note, your name.",
        f'- **Terminal**: `mardini promote --approve --flow-run {flow_run_id} --note "..."` '
        "(or `--reject`).",
        "",
        f"Without a decision by {deadline} (UTC) the flow fails and nothing is promoted.",
    ]
    return "\n".join(lines)


def publish_stage_report(stage: str, markdown: str, description: str) -> None:
    """The stage's markdown artifact, keyed ``stage-<name>`` (a re-run adds a version)."""
    _quiet(
        create_markdown_artifact,
        markdown=markdown,
        key=artifact_key("stage", stage),
        description=description,
    )


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "–"


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a Prefect artifact function; without an API (or on its error) log and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # the UI's extras never fail a training run
        log.debug("no Prefect artifact (%s): %s", fn.__name__, err)
        return None
