"""The train-curriculum flow end to end: local launcher (2 CPU ranks per stage), real shards,
SQLite MLflow registry, Prefect's test harness; a failing gate; a crashing rank."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from mardini.eval.evaluate import PER_FRAME_TABLE
from mardini.progress import LOGGER, StageEvent, event_of
from pipelines.curriculum_flow import SUMMARY_TABLE, train_curriculum
from pipelines.promotion import alias_version, registered_name
from tests.conftest import CONFIGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _config(tmp_path: Path, shards: str, name: str) -> str:
    raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    raw["name"] = name
    raw["model"] = {"preset": "debug"}
    raw["data"] = {"dataset": "clips", "shards": shards, "shuffle_buffer": 4}
    raw["sample"] = {"steps": 2}
    for stage in raw["stages"]:
        stage.update(
            steps=3, checkpoint_every=3, log_every=1, micro_batch=1, frames=4, resolution=32
        )
        stage["gates"] = [{"metric": "heldout_loss", "max": 10.0}]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _stage_runs(uri: str, curriculum: str) -> dict[str, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(curriculum)
    runs = client.search_runs([experiment.experiment_id])
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("stage", "<parent>"), []).append(run)
    return out


def _table(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> dict[str, list]:
    """A table artifact logged with ``log_table``, as columns."""
    saved = json.loads(Path(client.download_artifacts(run_id, path, str(tmp_path))).read_text())
    return {c: [row[i] for row in saved["data"]] for i, c in enumerate(saved["columns"])}


def _artifacts(
    flow_run_id: str | None = None, artifact_type: str | None = None, key: str | None = None
) -> list:
    """Prefect artifacts read back through the API, filtered by flow run, type and key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        ArtifactFilterType,
    )

    found = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None,
        type=ArtifactFilterType(any_=[artifact_type]) if artifact_type else None,
        key=ArtifactFilterKey(any_=[key]) if key else None,
    )
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=found)


def _no_training_processes_left() -> list[str]:
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "mardini.train" in cmd and "pytest" not in cmd:
            left.append(cmd)
    return left


@pytest.fixture
def progress_events():
    """The StageEvents the flow and the launcher log on the progress logger."""
    events: list[StageEvent] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if (event := event_of(record)) is not None:
                events.append(event)

    logger, handler = logging.getLogger(LOGGER), Collect()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield events
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_every_stage_promoted_and_champion_set(tmp_path, train_shards, mlflow_uri, progress_events):
    config = _config(tmp_path, train_shards, "flow-e2e")
    promoted = train_curriculum(config=config, store=str(tmp_path / "store"), nproc_per_node=2)
    client = MlflowClient(mlflow_uri)
    name = registered_name("flow-e2e")
    stages = ["mar", "dm", "joint-interpolation", "joint-i2v"]
    assert list(promoted) == stages
    for stage in stages:
        assert alias_version(client, name, stage) == promoted[stage]
        assert alias_version(client, name, f"{stage}-candidate") == promoted[stage]
    assert alias_version(client, name, "champion") == promoted["joint-i2v"]
    runs = _stage_runs(mlflow_uri, "flow-e2e")
    parent = runs["<parent>"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    for stage in stages:
        (child,) = runs[stage]
        assert child.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert "heldout_loss" in child.data.metrics
    assert parent[0].data.tags["prefect.flow_run_id"]

    # The registry page: each version's description is its gate report; tags say what it is.
    for stage in stages:
        version = client.get_model_version(name, promoted[stage])
        assert version.description.startswith(f"gates of stage '{stage}': PASSED")
        assert "heldout_loss" in version.description
        assert version.tags["stage"] == stage and version.tags["curriculum"] == "flow-e2e"
        child_loss = runs[stage][0].data.metrics["heldout_loss"]
        assert float(version.tags["heldout_loss"]) == pytest.approx(child_loss, rel=1e-3)
    assert "interp_psnr" in client.get_model_version(name, promoted["joint-i2v"]).tags

    # MLflow at a glance: the model-training view; eval metrics at the stage's last training
    # step (beside the loss curve); per-frame curves as a table, never metrics stepped by frame.
    assert client.get_experiment_by_name("flow-e2e").tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    for stage in stages:
        (child,) = runs[stage]
        frame_metrics = [k for k in child.data.metrics if k.endswith("_per_frame")]
        assert all(k.endswith("_seconds_per_frame") for k in frame_metrics), frame_metrics
        loss_steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        eval_steps = [m.step for m in client.get_metric_history(child.info.run_id, "heldout_loss")]
        assert eval_steps == [max(loss_steps)] == [3]
    eval_files = {a.path for a in client.list_artifacts(runs["joint-i2v"][0].info.run_id, "eval")}
    assert PER_FRAME_TABLE in eval_files
    # The parent run: the resolved config as params, the stage summary as a table.
    params = parent[0].data.params
    assert params["name"] == "flow-e2e" and params["model.preset"] == "debug"
    assert params["stages.1.name"] == "dm" and params["stages.1.steps"] == "3"
    summary = _table(client, parent[0].info.run_id, SUMMARY_TABLE, tmp_path)
    assert summary["stage"] == stages and summary["gates"] == ["passed"] * len(stages)
    assert summary["version"] == [promoted[s] for s in stages]
    assert summary["heldout_loss"][0] == pytest.approx(runs["mar"][0].data.metrics["heldout_loss"])

    # Prefect at a glance: a report per stage and a finished progress bar, in this flow run.
    flow_run_id = parent[0].data.tags["prefect.flow_run_id"]
    reports = _artifacts(flow_run_id, artifact_type="markdown")
    for stage in stages:
        (report,) = [a for a in reports if a.key == f"stage-{stage}"]
        assert report.data.startswith(f"# Stage `{stage}` passed its gates")
        assert "heldout_loss" in report.data and f"Model version: {promoted[stage]}" in report.data
        assert runs[stage][0].info.run_id in report.data
    assert "| interp_psnr |" in next(a for a in reports if a.key == "stage-joint-i2v").data
    bars = {a.key: a for a in _artifacts(flow_run_id, artifact_type="progress")}
    assert set(bars) == {f"progress-{stage}" for stage in stages}
    assert all(bar.data == 100.0 for bar in bars.values())

    # The console's progress: every stage's last training step, read back from its rank's log.
    by_stage = {s: [e for e in progress_events if e.stage == s] for s in stages}
    for stage, events in by_stage.items():
        steps = [e.step for e in events if e.phase == "train"]
        assert steps[0] == 0 and steps[-1] == 3, (stage, events)
        assert [e.phase for e in events if e.phase != "train"] == ["evaluate", "gates", "promoted"]

    # A rerun skips every stage and adds no (empty) parent run.
    progress_events.clear()
    assert train_curriculum(config=config, store=str(tmp_path / "store")) == promoted
    assert len(_stage_runs(mlflow_uri, "flow-e2e")["<parent>"]) == 1
    assert [e.phase for e in progress_events] == ["skipped"] * len(stages)
    # ... and the first run's stage reports stay findable under their keys.
    (kept,) = [a for a in _artifacts(key="stage-mar") if str(a.flow_run_id) == flow_run_id]
    assert kept.type == "markdown"


def test_failed_gate_stops_the_flow_and_a_rerun_resumes(tmp_path, train_shards, mlflow_uri):
    # This curriculum trains from cached latents: the flow writes the cache before each stage.
    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    config = _config(tmp_path, str(shards), "flow-gate")
    store = str(tmp_path / "store")
    state = train_curriculum(
        config=config,
        store=store,
        overrides=["stages.dm.gates.0.max=1e-9", "data.latents=true"],
        return_state=True,
    )
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "heldout_loss" in message and "1e-09" in message and "dm" in message
    client = MlflowClient(mlflow_uri)
    name = registered_name("flow-gate")
    assert alias_version(client, name, "mar") is not None
    assert alias_version(client, name, "dm") is None  # nothing promoted for the failed stage
    candidate = alias_version(client, name, "dm-candidate")
    assert candidate is not None  # kept for a human to inspect, with the evidence
    description = client.get_model_version(name, candidate).description
    assert "FAILED" in description and "heldout_loss" in description
    assert not (
        Path(store) / "runs" / "flow-gate" / "joint-interpolation"
    ).exists()  # never launched

    assert len(list(shards.glob("latents/32px-*/train/shard-*.tar"))) == 2
    # The cache was written by its own process (the local form of the Indexed Job), which left
    # its record where the flow looks first on a rerun.
    (dm_latents,) = (Path(store) / "runs" / "flow-gate" / "dm" / "latents").glob("*.json")
    assert "/latents/32px-" in json.loads(dm_latents.read_text())["url"]
    dm_export = Path(store) / "runs" / "flow-gate" / "dm" / "final" / "metadata.json"
    exported_at = dm_export.stat().st_mtime_ns
    # The evaluation ran as its own process and left its results and samples in the store.
    (dm_eval,) = (Path(store) / "runs" / "flow-gate" / "dm" / "eval").glob("*/eval.json")
    assert json.loads(dm_eval.read_text())["results"]["heldout_loss"] > 1e-9
    assert {p.name for p in (dm_eval.parent / "samples").iterdir()} >= {"interp.gif"}
    evaluated_at = dm_eval.stat().st_mtime_ns
    promoted = train_curriculum(
        config=config, store=store, overrides=["stages.dm.gates.0.max=10", "data.latents=true"]
    )
    assert alias_version(client, name, "champion") == promoted["joint-i2v"]
    runs = _stage_runs(mlflow_uri, "flow-gate")
    assert len(runs["mar"]) == 1  # the rerun skipped the promoted stage
    assert len(runs["dm"]) == 1  # ... and dm's run is the one that trained it
    # Only a gate changed: no job launched to retrain dm or to evaluate it again; the new gate
    # was applied to the results of the first evaluation.
    assert dm_export.stat().st_mtime_ns == exported_at
    assert dm_eval.stat().st_mtime_ns == evaluated_at


def test_a_crashing_rank_fails_the_flow_with_its_log_tail(
    tmp_path, train_shards, mlflow_uri, monkeypatch
):
    config = _config(tmp_path, train_shards, "flow-crash")
    monkeypatch.setenv("MARDINI_FAULT", "step:1:1")  # rank 1 SIGKILLs itself at its second step
    # No restart allowed: the failure reaches the flow (with restarts the group would resume).
    state = train_curriculum(
        config=config, store=str(tmp_path / "store"), max_restarts=0, return_state=True
    )
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "stage 'mar'" in message and "exited with code" in message
    assert "last log lines" in message and "rank" in message
    assert _no_training_processes_left() == []


def test_stage_report_keys_and_clickable_links():
    from pipelines.artifacts import artifact_key, stage_markdown
    from pipelines.curriculum_flow import _markdown_link

    assert artifact_key("stage", "Joint_I2V.v2") == "stage-joint-i2v-v2"
    link = _markdown_link("http://mlflow:5000", "3", "abc")
    assert link == "[abc](http://mlflow:5000/#/experiments/3/runs/abc)"
    assert _markdown_link("sqlite:///x.db", "3", "abc") == "run abc in sqlite:///x.db"
    metrics = {"interp_psnr": 20.0, "baseline_nearest_interp_psnr": 19.0, "heldout_loss": 0.1}
    markdown = stage_markdown("joint-i2v", "gates: FAILED", False, metrics, link, "4")
    assert markdown.startswith("# Stage `joint-i2v` FAILED its gates")
    assert link in markdown and "| interp_psnr | 20 | 19 | – |" in markdown
    assert "| heldout_loss | 0.1 |" in markdown


def test_an_existing_experiment_gets_the_model_training_kind(mlflow_uri):
    from mardini.mlflow_setup import EXPERIMENT_KIND, ensure_experiment

    client = MlflowClient(mlflow_uri)
    created = client.create_experiment("made-before")  # e.g. by an older version of this code
    assert EXPERIMENT_KIND[0] not in client.get_experiment(created).tags
    assert ensure_experiment("made-before", uri=mlflow_uri) == created
    assert client.get_experiment(created).tags[EXPERIMENT_KIND[0]] == "custom_model_development"


def test_a_manual_stage_nobody_answers_times_out_cleanly(tmp_path, train_shards, mlflow_uri):
    """Called directly (no deployment) a manual stage pauses in-process; with no decision in
    ``approval_timeout_s`` the flow fails, the version says so, and no alias moves."""
    from pipelines.approval import APPROVAL, ApprovalTimedOut

    path = Path(_config(tmp_path, train_shards, "undecided"))
    raw = yaml.safe_load(path.read_text())
    raw["stages"] = raw["stages"][:1]
    raw["promotion"], raw["approval_timeout_s"] = "manual", 3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ApprovalTimedOut, match="no decision within 3 s"):
        train_curriculum(config=str(path), store=str(tmp_path / "store"), nproc_per_node=1)
    client, name = MlflowClient(mlflow_uri), registered_name("undecided")
    assert alias_version(client, name, "mar") is None
    candidate = alias_version(client, name, "mar-candidate")
    assert client.get_model_version(name, candidate).tags[APPROVAL] == "timed out"


def test_console_summary_puts_psnr_and_fvd_beside_the_baselines():
    from pipelines.artifacts import held_out_summary

    metrics = {
        "interp_psnr": 26.3, "baseline_nearest_interp_psnr": 25.6,
        "baseline_blend_interp_psnr": 26.27, "fvd_interp": 650.2,
        "baseline_nearest_fvd_interp": 618.0, "baseline_blend_fvd_interp": 763.0,
        "fvd_real_halves": 1404.0, "fvd_clips": 4,
    }  # fmt: skip
    lines = held_out_summary(metrics).splitlines()
    assert lines[0].strip() == (
        "held out, interpolation: PSNR 26.30 dB (nearest 25.60, blend 26.27); "
        "FVD 650 (nearest 618, blend 763)"
    )
    assert "4 clips" in lines[1] and "1404" in lines[1]
    assert held_out_summary({"heldout_loss": 0.5}) == ""  # a mar stage: nothing to compare


def test_an_export_from_before_a_new_field_counts_as_the_same_training():
    """``same_training`` reads the recorded configs back at their defaults: an export written
    before ``precision`` / ``time_shift`` existed matches a config that leaves them at the
    default, and not one that sets another value."""
    from mardini.config import load_config
    from pipelines.curriculum_flow import same_training

    cfg = load_config(CONFIGS / "tiny.yaml", ["model.time_shift=1.0"])
    stage = cfg.stage("dm").model_dump(mode="json")
    model = cfg.model.model_dump(mode="json")
    old = {"stage_config": {k: v for k, v in stage.items() if k != "precision"}}
    old["model"] = {k: v for k, v in model.items() if k != "time_shift"}
    assert same_training(old, cfg, "dm")
    assert not same_training(old, load_config(CONFIGS / "tiny.yaml"), "dm")  # time_shift 3
    assert not same_training({"stage_config": {"gone": 1}, "model": model}, cfg, "dm")
