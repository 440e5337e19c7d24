"""The ``train-curriculum`` flow: every stage trained as a job, evaluated, gated, promoted.

Reads like the runbook: for each stage in order — skip it if its alias is already set; launch
its training job (local processes or a Kubeflow PyTorchJob); evaluate the exported weights on
the held-out split; register them as ``{stage}-candidate``; apply the stage's gates; promote to
``{stage}`` (and ``champion`` after the last stage) or fail with the gate report.

Also here: ``evaluate-checkpoint`` and ``promote-checkpoint``, so that a person can re-evaluate
any version and promote by hand.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import Pause
from prefect.runtime import deployment, flow_run

from mardini.config import CurriculumConfig, ModelConfig, StageConfig, load_config
from mardini.export import read_final_meta
from mardini.layout import final_url, stage_dir
from mardini.mlflow_setup import ensure_experiment, log_params, mlflow_client, tracking_uri
from mardini.progress import StageEvent, emit
from mardini.storage import is_local_url, join, read_json, store_root
from pipelines.approval import (
    ApprovalTimedOut,
    PromotionRejected,
    mark_pending,
    pending_version,
    record_decision,
    wait_for_decision,
)
from pipelines.artifacts import (
    StageProgress,
    approval_markdown,
    held_out_summary,
    publish_stage_report,
    stage_markdown,
)
from pipelines.promotion import alias_version, promote, registered_name

log = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """A stage's gates did not pass; the message is the gate report."""


# ----------------------------------------------------------------------------- tasks


@task(name="resolve-config", cache_policy=NO_CACHE)
def resolve_config(config: str, overrides: list[str], store: str) -> tuple[CurriculumConfig, str]:
    """Load the curriculum with overrides and write the resolved YAML the jobs will read."""
    cfg = load_config(config, overrides)
    if not overrides:
        return cfg, config
    # Jobs read one file: the resolved config, kept with the runs so a rerun sees the same one.
    local = is_local_url(store)
    root = store.removeprefix("file://") if local else os.environ.get("TMPDIR", "/tmp")
    path = Path(root) / "runs" / cfg.name / "curriculum.resolved.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = cfg.model_dump(mode="json", exclude={"source"})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path), str(path)


def _run_where_the_gpus_are(
    cfg: CurriculumConfig,
    launcher: str,
    what: str,
    command_for: Any,
    build: Any,
    env: dict[str, str],
    config_path: str | None,
    image: str | None,
    timeout_s: float | None,
) -> None:
    """Run a heavy step that is not training: ``command_for(config path, launch settings)``
    as a subprocess (``local``; no launch settings) or as the Kubernetes Job that
    ``build(command, launch settings)`` makes (``kubeflow``, the image's config path)."""
    from pipelines.launchers import batch_job

    if launcher == "local":
        command = command_for(config_path or str(cfg.source), None)
        batch_job.run_local(command, env, timeout_s, what=what)
    elif launcher == "kubeflow":
        from pipelines.launchers.pytorchjob import LaunchConfig, image_config_path

        launch = LaunchConfig.from_env(os.environ, **({"image": image} if image else {}))
        command = command_for(image_config_path(str(cfg.source)), launch)
        batch_job.run_job(build(command, launch), timeout_s=timeout_s, what=what)
    else:
        raise ValueError(f"unknown launcher {launcher!r}; use 'local' or 'kubeflow'")


def _weights_digest(store: str, cfg: CurriculumConfig, stage: str) -> str | None:
    """The SHA-256 of a stage's exported weights (None when it has no export, or an old one)."""
    return (read_final_meta(final_url(store, cfg.name, stage)) or {}).get("weights_sha256")


@task(name="cache-latents", cache_policy=NO_CACHE, retries=1)
def cache_stage_latents(
    cfg: CurriculumConfig,
    stage: str,
    store: str,
    launcher: str = "local",
    config_path: str | None = None,
    image: str | None = None,
    timeout_s: float | None = None,
) -> str:
    """Write (or resume) the latent cache a ``data.latents`` stage trains from, where the GPUs
    are, not in this process: an Indexed Kubernetes Job (``kubeflow``; ``MARDINI_K8S_LATENT_PARTS``
    pods, default 8), or a subprocess running the same command (``local``). Returns the cache's
    URL, read back from the record the job leaves; a cache finished before is not run again."""
    from mardini.layout import shards_url
    from pipelines.launchers import latents_job

    st = cfg.stage(stage)
    shards = shards_url(cfg, store, st)
    splits = (cfg.data.train_split,)
    sources = [
        source if source.startswith("models:/") else [source, _weights_digest(store, cfg, source)]
        for source in st.init_from
    ]
    key = latents_job.latents_key(cfg, stage, shards, splits, sources)
    record_to = join(stage_dir(store, cfg.name, stage), "latents", f"{key}.json")
    # A models:/ alias may move to other weights under the same key: run again (resuming).
    moving = any(source.startswith("models:/") for source in st.init_from)
    record = None if moving else read_json(record_to)
    if record is not None:
        get_run_logger().info("stage %s: latents cached before, at %s", stage, record["url"])
        return record["url"]
    parts = lambda launch: launch.latent_parts if launch else 1  # noqa: E731
    _run_where_the_gpus_are(
        cfg,
        launcher,
        "latent cache",
        lambda path, launch: latents_job.latents_command(
            path, stage, shards, splits, parts(launch), record_to
        ),
        lambda command, launch: latents_job.build_latents_job(
            cfg, stage, command, key, parts(launch), launch
        ),
        {"MARDINI_STORE": store},
        config_path,
        image,
        timeout_s,
    )
    record = read_json(record_to)
    if record is None:
        raise RuntimeError(
            f"stage {stage!r}: the latent cache job succeeded but left no record at {record_to}"
        )
    return record["url"]


# Stage settings that do not change the trained weights: a change to them alone retrains nothing.
_NOT_TRAINING = {
    "gates",
    "promotion",
    "checkpoint_every",
    "checkpoint_every_minutes",
    "keep_checkpoints",
    "log_every",
}


def same_training(meta: dict[str, Any], cfg: CurriculumConfig, stage: str) -> bool:
    """Whether an export's metadata says it was trained with this model and stage config.

    The recorded configs are read back through their models first, so a field added since
    (``precision``, ``time_shift``) counts at its default, which is what that export used."""
    try:
        have_stage = StageConfig.model_validate(meta.get("stage_config") or {})
        have_model = ModelConfig.model_validate(meta.get("model") or {})
    except ValueError:  # written by a version whose fields no longer exist: not comparable
        return False
    want = cfg.stage(stage).model_dump(mode="json", exclude=_NOT_TRAINING)
    have = have_stage.model_dump(mode="json", exclude=_NOT_TRAINING)
    return have == want and have_model.model_dump(mode="json") == cfg.model.model_dump(mode="json")


@task(name="train-stage", cache_policy=NO_CACHE)
def train_stage(
    config_path: str,
    cfg: CurriculumConfig,
    stage: str,
    launcher: str,
    store: str,
    parent_run_id: str,
    nnodes: int,
    nproc_per_node: int,
    image: str | None,
    timeout_s: float | None,
    max_restarts: int | None = None,
) -> dict[str, Any]:
    """Run the stage's training job to completion and return its export's metadata.

    ``max_restarts``: how often torchrun restarts the ranks from the latest checkpoint after
    one fails (None: the launcher's default)."""
    env = {
        "MARDINI_STORE": store,
        "MARDINI_PARENT_RUN_ID": parent_run_id,
        "MLFLOW_TRACKING_URI": tracking_uri(store),
    }
    start = time.monotonic()
    total = cfg.stage(stage).steps
    progress = StageProgress(stage, total)  # the flow run's progress bar while the job runs
    final = final_url(store, cfg.name, stage)
    done = read_final_meta(final)
    if done is not None and same_training(done, cfg, stage):
        # A job that finished before (the flow died after it, or a gate failed and was changed):
        # its export is complete and was trained with this config, so no job is launched again.
        get_run_logger().info("stage %s: complete export at %s, same config: not retrained", stage, final)  # fmt: skip
        progress.set(total, f"stage {stage}: trained before, {total}/{total} steps")
        return {**done, "final_url": final, "train_seconds": 0.0}
    if launcher == "local":
        from pipelines.launchers.local import run_local

        run_local(
            config_path,
            stage,
            nnodes=nnodes,
            nproc_per_node=nproc_per_node,
            env=env,
            timeout_s=timeout_s,
            on_step=progress.step,
            **({} if max_restarts is None else {"max_restarts": max_restarts}),
        )
    elif launcher == "kubeflow":
        from pipelines.launchers.kubeflow import run_pytorchjob

        run_pytorchjob(cfg, stage, config_path=None, image=image, nnodes=nnodes,
                       nproc_per_node=nproc_per_node, run_id=parent_run_id, timeout_s=timeout_s,
                       max_restarts=max_restarts)  # fmt: skip
    else:
        raise ValueError(f"unknown launcher {launcher!r}; use 'local' or 'kubeflow'")
    progress.set(total, f"stage {stage}: trained, {total}/{total} steps")
    meta = read_final_meta(final)
    if meta is None:
        raise RuntimeError(f"stage {stage!r}: the job succeeded but {final} holds no export")
    meta["final_url"] = final
    meta["train_seconds"] = time.monotonic() - start
    return meta


@task(name="evaluate-stage", cache_policy=NO_CACHE)
def evaluate_stage(
    cfg: CurriculumConfig,
    stage: str,
    final_url: str,
    store: str,
    run_id: str | None,
    uri: str,
    launcher: str = "local",
    config_path: str | None = None,
    image: str | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Evaluate the stage's export on the held-out split where the GPUs are, not in this
    process: a Kubernetes Job from the training image (``kubeflow``), or a subprocess running
    the same command (``local``). It logs to the stage's MLflow run and writes ``eval.json`` to
    the store, which is read back here. An evaluation with the same export, settings and data
    finished before is not run again."""
    from mardini.eval.evaluate import stage_eval_settings
    from mardini.eval.job import eval_dir, eval_key, read_results
    from mardini.layout import shards_url
    from pipelines.launchers import eval_job

    data = shards_url(cfg, store, cfg.stage(stage))
    meta = read_final_meta(final_url) or {}
    out = eval_dir(
        stage_dir(store, cfg.name, stage), eval_key(meta, stage_eval_settings(cfg, stage), data)
    )
    results = read_results(out)
    if results is not None:
        get_run_logger().info("stage %s: evaluated before, results at %s", stage, out)
        return results
    _run_where_the_gpus_are(
        cfg,
        launcher,
        "evaluation",
        lambda path, launch: eval_job.eval_command(path, stage, final_url, out, data, run_id),
        lambda command, launch: eval_job.build_eval_job(
            cfg, stage, command, out.rsplit("/", 1)[1], run_id, launch
        ),
        {"MARDINI_STORE": store, "MLFLOW_TRACKING_URI": uri},
        config_path,
        image,
        timeout_s,
    )
    results = read_results(out)
    if results is None:
        raise RuntimeError(
            f"stage {stage!r}: the evaluation succeeded but {out} holds no eval.json"
        )
    return results


# Held-out metrics every version is tagged with when its evaluation has them (plus its gates').
KEY_METRICS = (
    "heldout_loss",
    "interp_psnr",
    "baseline_nearest_interp_psnr",
    "baseline_blend_interp_psnr",
    "i2v_psnr",
    "baseline_nearest_i2v_psnr",
    "baseline_blend_i2v_psnr",
    "fvd_interp",
    "baseline_nearest_fvd_interp",
    "fvd_i2v",
    "baseline_nearest_fvd_i2v",
    "fvd_real_halves",
    "ae_psnr",
)


def version_tags(cfg: CurriculumConfig, stage: str, metrics: dict[str, Any]) -> dict[str, str]:
    """A stage's model version tags: curriculum, stage, kind, and its key held-out metrics."""
    from mardini.eval.gates import baseline_metric

    st = cfg.stage(stage)
    tags = {"curriculum": cfg.name, "stage": stage, "kind": st.kind}
    keys = list(KEY_METRICS)
    for gate in st.gates:
        keys.append(gate.metric)
        if gate.beats:
            keys.append(baseline_metric(gate.metric, gate.beats))
    for key in dict.fromkeys(keys):
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            tags[key] = f"{value:.4g}"
    return tags


@task(name="register-candidate", cache_policy=NO_CACHE)
def register_candidate(
    cfg: CurriculumConfig,
    stage: str,
    final_url: str,
    run_id: str | None,
    uri: str,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Log the stage's weights as an MLflow model version with alias ``{stage}-candidate``,
    tagged with the curriculum, the stage and its key held-out metrics."""
    from mardini.mlflow_model import log_model

    name = registered_name(cfg.name)
    model_uri = log_model(final_url, registered_model_name=name, run_id=run_id, tracking_uri=uri)
    version = model_uri.rsplit("/", 1)[-1]  # models:/name/version
    client = mlflow_client(uri)
    # A candidate still waiting for a decision from an ended flow run is replaced: say so.
    pending_version(client, name, stage, str(flow_run.get_id() or ""))
    client.set_registered_model_alias(name, f"{stage}-candidate", version)
    if run_id:
        client.set_model_version_tag(name, version, "run_id", run_id)
    client.set_model_version_tag(name, version, "export", final_url)  # what it refers to
    for key, value in version_tags(cfg, stage, metrics or {}).items():
        client.set_model_version_tag(name, version, key, value)
    return version


def describe_version(client: MlflowClient, name: str, version: str, report: str) -> None:
    """Make the gate report the version's description (the registry page shows it first)."""
    client.update_model_version(name, version, description=report)


@task(name="apply-gates", cache_policy=NO_CACHE)
def apply_gates(cfg: CurriculumConfig, stage: str, metrics: dict[str, Any], run_link: str) -> str:
    """Evaluate the stage's gates; raise ``GateFailed`` with the report when one fails."""
    from mardini.eval.gates import check_gates

    report = check_gates(cfg.stage(stage).gates, metrics, stage=stage)
    if not report.passed:
        raise GateFailed(f"stage {stage!r} failed its gates (MLflow: {run_link})\n{report}")
    return str(report)


# ----------------------------------------------------------------------------- flows


@flow(name="train-curriculum", log_prints=True)
def train_curriculum(
    config: str = "configs/tiny.yaml",
    launcher: str = "local",
    store: str | None = None,
    image: str | None = None,
    overrides: list[str] | None = None,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    timeout_s: float | None = None,
    max_restarts: int | None = None,
) -> dict[str, str]:
    """Train, evaluate, gate and promote every stage of a curriculum; returns stage -> version.

    ``max_restarts``: restarts of a stage's ranks from its latest checkpoint after one fails
    (default: 1 locally, ``LaunchConfig.max_restarts`` on Kubeflow)."""
    logger = get_run_logger()
    store = store_root(store)
    uri = tracking_uri(store)
    if launcher == "kubeflow" and overrides:
        raise ValueError(
            "overrides are not supported with the kubeflow launcher: pods read the config baked "
            "into the image; commit a config file with the changes and pass its path instead"
        )
    cfg, config_path = resolve_config(config, list(overrides or []), store)
    name = registered_name(cfg.name)
    client = mlflow_client(uri)
    experiment_id = ensure_experiment(cfg.name, store, uri)
    this_run = str(flow_run.get_id() or "")
    # Created with the first stage that has work: a rerun that skips every stage adds no run.
    parent_id: str | None = None
    promoted: dict[str, str] = {}
    summary: list[dict[str, Any]] = []  # one row per stage: the parent run's summary table
    status = "FAILED"
    try:
        for index, stage in enumerate(cfg.stages):
            last = index == len(cfg.stages) - 1
            done = alias_version(client, name, stage.name)
            if done is not None:
                logger.info("stage %s already promoted (version %s): skipped", stage.name, done)
                emit(StageEvent(stage.name, "skipped", text=f"already promoted (version {done})"))
                promoted[stage.name] = done
                summary.append(_summary_row(stage.name, done, "skipped (promoted before)", {}))
                continue
            if parent_id is None:
                parent_id = _start_parent_run(client, uri, cfg.name, experiment_id, launcher)
                if not client.get_run(parent_id).data.params:
                    log_params(client, parent_id, cfg.model_dump(mode="json", exclude={"source"}))
            manual = cfg.promotion_of(stage.name) == "manual"
            waiting = pending_version(client, name, stage.name, this_run) if manual else None
            if waiting is not None:  # a resumed run: trained, evaluated, gated; decision left
                logger.info("stage %s: version %s waits for its decision", stage.name, waiting)
                tags = client.get_model_version(name, waiting).tags
                version, run_id = waiting, tags.get("run_id")
                summary.append(_summary_row(stage.name, version, "passed", _tag_metrics(tags)))
            else:
                if cfg.data.latents and stage.kind != "autoencoder":
                    url = cache_stage_latents(
                        cfg, stage.name, store, launcher, config_path, image, timeout_s
                    )
                    logger.info("stage %s: latents cached at %s", stage.name, url)
                logger.info("stage %s: training (%s launcher)", stage.name, launcher)
                emit(StageEvent(stage.name, "train", step=0, total=stage.steps))
                meta = train_stage(
                    config_path,
                    cfg,
                    stage.name,
                    launcher,
                    store,
                    parent_id,
                    nnodes,
                    nproc_per_node,
                    image,
                    timeout_s,
                    max_restarts,
                )
                client.log_metric(parent_id, f"{stage.name}.train_seconds", meta["train_seconds"])
                run_id = meta.get("mlflow_run_id")
                emit(StageEvent(stage.name, "evaluate"))
                metrics = evaluate_stage(cfg, stage.name, meta["final_url"], store, run_id, uri,
                                         launcher, config_path, image, timeout_s)  # fmt: skip
                version = register_candidate(
                    cfg, stage.name, meta["final_url"], run_id, uri, metrics
                )
                link = _run_link(uri, experiment_id, run_id)
                try:
                    report = apply_gates(cfg, stage.name, metrics, link)
                except GateFailed as err:
                    describe_version(client, name, version, str(err))  # the evidence for a person
                    text = f"{err}\n{held_out_summary(metrics)}".rstrip()
                    emit(StageEvent(stage.name, "gates", text=text, passed=False))
                    summary.append(_summary_row(stage.name, version, "FAILED", metrics))
                    _stage_report(stage.name, str(err), False, metrics, uri, experiment_id, run_id, version)  # fmt: skip
                    raise
                describe_version(client, name, version, report)
                summary.append(_summary_row(stage.name, version, "passed", metrics))
                _stage_report(
                    stage.name, report, True, metrics, uri, experiment_id, run_id, version
                )
                logger.info("stage %s passed its gates:\n%s", stage.name, report)
                text = f"{report}\n{held_out_summary(metrics)}".rstrip()
                emit(StageEvent(stage.name, "gates", text=text, passed=True))
            if manual:
                _decide(client, cfg, stage.name, version, uri, experiment_id, run_id)
            promote(client, name, version, stage.name, last=last)
            promoted[stage.name] = version
            champion = " and champion" if last else ""
            emit(
                StageEvent(
                    stage.name, "promoted", text=f"version {version} as {stage.name}{champion}"
                )
            )
        status = "FINISHED"
    except Pause:
        # Suspended for a decision: the resumed run carries on with this MLflow run.
        status = None
        raise
    finally:
        if parent_id is not None and status is not None:
            client.log_table(parent_id, _summary_table(summary), SUMMARY_TABLE)
            client.set_terminated(parent_id, status=status)
    if parent_id is None:
        logger.info("every stage of %s was promoted already: nothing to train", cfg.name)
    logger.info(
        "curriculum %s promoted: %s (champion = %s)",
        cfg.name,
        promoted,
        promoted.get(cfg.stages[-1].name),
    )
    return promoted


def _tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    """A version's key-metric tags back as numbers (a resumed run's summary row)."""
    out = {}
    for key in KEY_METRICS:
        try:
            out[key] = float(tags[key])
        except (KeyError, ValueError):
            pass
    return out


def _decide(
    client: MlflowClient,
    cfg: CurriculumConfig,
    stage: str,
    version: str,
    uri: str,
    experiment_id: str,
    run_id: str | None,
) -> None:
    """A manual stage: publish the evidence, wait for a person, record the decision; returns
    when approved, raises ``PromotionRejected`` (or ``ApprovalTimedOut``) otherwise."""
    logger = get_run_logger()
    name = registered_name(cfg.name)
    this_run = str(flow_run.get_id() or "")
    samples = _sample_links(client, uri, run_id)
    # Suspend (free the process) when a deployment can start this flow run again; else pause.
    suspend = bool(deployment.get_id())
    if client.get_model_version(name, version).tags.get("approval") != "pending":
        deadline = mark_pending(client, name, version, this_run, cfg.approval_timeout_s)
        markdown = approval_markdown(
            stage, version, _markdown_link(uri, experiment_id, run_id), samples, this_run, deadline
        )
        publish_stage_report(f"{stage}-approval", markdown, f"stage {stage}: waiting for approval")
        description = client.get_model_version(name, version).description or ""
        links = [link for _, link in samples]
        evidence = "\n".join(["", "Sent for approval with this evidence:", *links])
        client.update_model_version(name, version, description=description + evidence)
        emit(StageEvent(stage, "approval", text=f"version {version} waits until {deadline}"))
        logger.info(
            "stage %s: version %s waits for a person (Prefect UI: this flow run's Resume, or "
            "`mardini promote --approve --flow-run %s`), until %s",
            stage, version, this_run, deadline,
        )  # fmt: skip
    try:
        decision = wait_for_decision(stage, version, cfg.approval_timeout_s, suspend)
    except ApprovalTimedOut:
        record_decision(client, name, version, None, "timed out")
        raise
    if decision.decision == "approve":
        line = record_decision(client, name, version, decision, "approved")
        logger.info("stage %s version %s: %s", stage, version, line)
        emit(StageEvent(stage, "approval", text=line))
        return
    line = record_decision(client, name, version, decision, "rejected")
    emit(StageEvent(stage, "approval", text=line))
    raise PromotionRejected(f"stage {stage!r} version {version}: {line}; nothing was promoted")


def _sample_links(client: MlflowClient, uri: str, run_id: str | None) -> list[tuple[str, str]]:
    """The stage run's labelled sample GIFs as (file name, link): URLs on a tracking server,
    else artifact paths."""
    if not run_id:
        return []
    try:
        files = [f.path for f in client.list_artifacts(run_id, "eval/samples")]
    except Exception as err:  # no artifacts (an eval without grids): no pictures, no failure
        log.debug("no sample artifacts for run %s: %s", run_id, err)
        return []
    gifs = sorted(p for p in files if p.endswith(".gif"))

    def link(path: str) -> str:
        if uri.startswith("http"):
            return f"{uri.rstrip('/')}/get-artifact?path={path}&run_uuid={run_id}"
        return f"{path} (artifact of run {run_id})"

    return [(p.rsplit("/", 1)[-1], link(p)) for p in gifs]


# The parent run's artifact holding one row per stage (stage, version, gates, key metrics).
SUMMARY_TABLE = "curriculum_summary.json"


def _summary_row(
    stage: str, version: str | None, gates: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    """A row of the curriculum's summary table."""
    row: dict[str, Any] = {"stage": stage, "version": version, "gates": gates}
    for key in KEY_METRICS:
        value = metrics.get(key)
        row[key] = value if isinstance(value, int | float) else None
    return row


def _summary_table(rows: list[dict[str, Any]]) -> Any:
    """The rows as a DataFrame for ``MlflowClient.log_table`` (object columns: pandas' str
    dtype makes MLflow's table check warn)."""
    import pandas as pd

    columns = ["stage", "version", "gates", *KEY_METRICS]
    return pd.DataFrame({c: [row.get(c) for row in rows] for c in columns}, dtype=object)


def _stage_report(
    stage: str,
    report: str,
    passed: bool,
    metrics: dict[str, Any],
    uri: str,
    experiment_id: str,
    run_id: str | None,
    version: str | None,
) -> None:
    """The stage's markdown artifact in Prefect: gate report, metrics, MLflow link."""
    link = _markdown_link(uri, experiment_id, run_id)
    verdict = "passed" if passed else "failed"
    publish_stage_report(
        stage,
        stage_markdown(stage, report, passed, metrics, link, version),
        description=f"stage {stage}: gates {verdict}, version {version}",
    )


def _start_parent_run(
    client: MlflowClient, uri: str, curriculum: str, experiment_id: str, launcher: str
) -> str:
    """The MLflow run of this flow run, which the stages' runs nest under; returns its id. A
    flow run resumed after a suspension carries on with the run it started."""
    this_run = flow_run.get_id()
    if this_run:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{this_run}' and attributes.status = 'RUNNING'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
    parent = client.create_run(
        experiment_id,
        run_name=f"curriculum {flow_run.get_name() or ''}".strip(),
        tags={
            "curriculum": curriculum,
            "prefect.flow_run_id": str(flow_run.get_id()),
            "launcher": launcher,
        },
    )
    _link_runs(client, uri, parent.info.run_id, experiment_id)
    return parent.info.run_id


def _run_link(base: str, experiment_id: str, run_id: str | None) -> str:
    """The MLflow UI link of a run on a tracking server, else the run id and the store."""
    if run_id and base.startswith("http"):
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {base}"


def _markdown_link(base: str, experiment_id: str, run_id: str | None) -> str:
    """``_run_link`` as markdown: clickable in Prefect's UI when it is a server URL."""
    link = _run_link(base, experiment_id, run_id)
    return f"[{run_id}]({link})" if link.startswith("http") else link


def _link_runs(client: MlflowClient, uri: str, parent_id: str, experiment_id: str) -> None:
    """Cross-link: the Prefect flow run shows the MLflow run; the MLflow run names the flow run."""
    link = _run_link(uri, experiment_id, parent_id)
    try:
        create_markdown_artifact(
            key="mlflow-run",
            markdown=f"MLflow parent run: {_markdown_link(uri, experiment_id, parent_id)}",
            description="MLflow run of this flow run",
        )
    except Exception:  # no Prefect API (e.g. called as a plain function): the MLflow tag suffices
        log.debug("no Prefect artifact for %s", link)
    ui = os.environ.get("PREFECT_UI_URL")
    if ui and flow_run.get_id():
        client.set_tag(
            parent_id, "prefect.flow_run_url", f"{ui.rstrip('/')}/runs/flow-run/{flow_run.get_id()}"
        )


@flow(name="evaluate-checkpoint")
def evaluate_checkpoint(
    checkpoint: str, config: str, stage: str, data: str | None = None, store: str | None = None
) -> dict[str, Any]:
    """Re-evaluate any checkpoint (a final/ URL or models:/name@alias) on a stage's held-out split."""
    from mardini.eval import evaluate_final

    store = store_root(store)
    cfg = load_config(config)
    from mardini.layout import shards_url

    data = data or shards_url(cfg, store, cfg.stage(stage))
    return evaluate_final(checkpoint, cfg, stage, data=data, run_id=None)


@flow(name="promote-checkpoint")
def promote_checkpoint(
    curriculum: str, version: str, stage: str, champion: bool = False
) -> list[str]:
    """Promote a registered version by hand: alias ``{stage}`` (and ``champion``)."""
    return promote(
        mlflow_client(),
        registered_name(curriculum),
        version,
        stage,
        last=champion,
    )
