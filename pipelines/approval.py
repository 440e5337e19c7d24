"""Manual promotion: after a stage's gates pass, a person approves or rejects its candidate.

A ``manual`` stage (``promotion: manual`` in the YAML) registers its candidate as usual, marks
the version ``approval=pending`` in MLflow and waits for a ``Decision``: the Prefect UI shows a
form on the waiting flow run (its **Resume** button), ``mardini promote --approve`` / ``--reject``
answers from a terminal. How the flow waits depends on where it runs:

- a flow run of a deployment (``prefect deployment run train-curriculum/...``) is *suspended*:
  its process exits, so a cluster pod is not held for hours; resuming reschedules the run,
  which starts again from the top, skips the stages already promoted (their aliases) and the
  training of the waiting one (its version is tagged pending for this flow run), and reads
  the decision;
- a flow called directly (``mardini demo``, tests) *pauses*: it blocks in its process.

Either way the wait ends after ``approval_timeout_s``: a paused flow fails with
``ApprovalTimedOut``; a suspended one is failed by the Prefect server ("paused and never
resumed"), and a later run marks the stale candidate ``approval=expired``.

The decision is recorded on the model version (tags ``approval``, ``approval.by``,
``approval.at``, ``approval.note``, and a line in its description). A rejection moves no alias
and fails the flow with the note.
"""

from __future__ import annotations

import getpass
import logging
from datetime import UTC, datetime, timedelta
from typing import Literal

from mlflow.tracking import MlflowClient
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from pydantic import Field

log = logging.getLogger(__name__)

# Model version tags of the approval (the registry page lists them beside the metrics).
APPROVAL = "approval"  # pending | approved | rejected | timed out | expired
BY, AT, NOTE, FLOW_RUN, DEADLINE = (
    f"{APPROVAL}.{k}" for k in ("by", "at", "note", "flow_run", "deadline")
)
UNNAMED = "unnamed (Prefect UI)"


class Decision(RunInput):
    """The form on a flow run that waits for a person (Prefect UI: the flow run's Resume)."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: promote this version and go on; reject: promote nothing, fail"
    )
    note: str = Field("", description="Why; recorded on the MLflow model version")
    # Prefect's open-source server has no users, so the form asks; the CLI fills in $USER.
    reviewer: str = Field("", description="Your name; recorded on the MLflow model version")


class PromotionRejected(RuntimeError):
    """A person rejected a stage's candidate; the message carries their note."""


class ApprovalTimedOut(RuntimeError):
    """Nobody decided within the stage's ``approval_timeout_s``."""


def approval_key(stage: str, version: str) -> str:
    """The pause key of one stage's version: the same on the resumed run, so the orchestrator
    knows this wait has happened and hands back its decision instead of waiting again."""
    return f"approve-{stage}-v{version}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def mark_pending(
    client: MlflowClient, name: str, version: str, flow_run_id: str, timeout_s: int
) -> str:
    """Tag ``version`` as waiting for a decision in ``flow_run_id``; returns the deadline."""
    deadline = (datetime.now(UTC) + timedelta(seconds=timeout_s)).isoformat(timespec="seconds")
    for key, value in {APPROVAL: "pending", FLOW_RUN: flow_run_id, DEADLINE: deadline}.items():
        client.set_model_version_tag(name, version, key, value)
    return deadline


def pending_version(client: MlflowClient, name: str, stage: str, flow_run_id: str) -> str | None:
    """The stage's candidate version when it waits for a decision in this flow run (the run was
    suspended and is now resumed): its training and evaluation are done, only the decision is
    left. A candidate left pending by another flow run is marked ``expired``."""
    from pipelines.promotion import alias_version

    version = alias_version(client, name, f"{stage}-candidate")
    if version is None:
        return None
    tags = client.get_model_version(name, version).tags
    if tags.get(APPROVAL) != "pending":
        return None
    if tags.get(FLOW_RUN) == flow_run_id:
        return version
    client.set_model_version_tag(name, version, APPROVAL, "expired")
    log.info("%s version %s: its flow run %s ended undecided: expired", name, version,
             tags.get(FLOW_RUN))  # fmt: skip
    return None


def wait_for_decision(stage: str, version: str, timeout_s: int, suspend: bool) -> Decision:
    """Block (pause) or exit and come back (suspend) until a person decides; see the module."""
    key = approval_key(stage, version)
    if suspend:
        # The first call raises prefect's Pause (the process exits); the resumed run's call
        # returns the decision.
        return suspend_flow_run(wait_for_input=Decision, timeout=timeout_s, key=key)
    try:
        return pause_flow_run(
            wait_for_input=Decision, timeout=timeout_s, poll_interval=min(10, timeout_s), key=key
        )
    except FlowPauseTimeout as err:
        raise ApprovalTimedOut(
            f"stage {stage!r} version {version}: no decision within {timeout_s} s "
            "(approval_timeout_s); nothing was promoted"
        ) from err


def record_decision(
    client: MlflowClient, name: str, version: str, decision: Decision | None, outcome: str
) -> str:
    """Write who decided what, when and why on the version; returns the line written."""
    by = (decision.reviewer.strip() if decision else "") or (UNNAMED if decision else "nobody")
    note = decision.note.strip() if decision else ""
    at = now_iso()
    tags = {APPROVAL: outcome, BY: by, AT: at, NOTE: note or "-"}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:5000])
    line = f"{outcome.capitalize()} by {by} at {at}" + (f": {note}" if note else "")
    description = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"{line}\n\n{description}".strip())
    return line


def cli_reviewer() -> str:
    """Who answers from a terminal: $USER (or the login name)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry and no $USER (some containers)
        return "unknown (terminal)"


def waiting_runs(flow_name: str = "train-curriculum") -> list:
    """Flow runs of ``flow_name`` paused or suspended now (newest first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        )


def answer_waiting_run(decision: Decision, flow_run_id: str | None = None) -> str:
    """Resume the waiting flow run (``flow_run_id``, else the only one waiting) with
    ``decision``; returns its name. Raises ``LookupError`` saying what is waiting instead."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value() or "no PREFECT_API_URL (a temporary local server)"
    if flow_run_id is None:
        runs = waiting_runs()
        if not runs:
            raise LookupError(f"no train-curriculum flow run is waiting for a decision at {api}")
        if len(runs) > 1:
            listed = ", ".join(f"{r.id} ({r.name})" for r in runs)
            raise LookupError(f"{len(runs)} flow runs are waiting, pick one with --flow-run: {listed}")  # fmt: skip
        run = runs[0]
    else:
        try:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(UUID(flow_run_id))
        except (ValueError, ObjectNotFound) as err:
            raise LookupError(f"no flow run {flow_run_id!r} at {api}") from err
        if run.state is None or not run.state.is_paused():
            state = run.state.name if run.state else "no state"
            raise LookupError(f"flow run {flow_run_id} ({run.name}) is {state}, not waiting")
    try:
        resume_flow_run(run.id, run_input=decision.model_dump())
    except (FlowPauseTimeout, RuntimeError) as err:
        raise LookupError(f"flow run {run.id} ({run.name}) cannot be resumed: {err}") from err
    return str(run.name)
