"""A stage's evaluation where the GPUs are: a Kubernetes Job from the training image, or locally
a subprocess running the same command (``python -m mardini.eval.job``, see its docstring).

The flow only submits, waits (``batch_job.run_job`` / ``run_local``) and reads ``eval.json`` back
from the store. Each evaluation is keyed by what its results depend on
(``mardini.eval.job.eval_key``), and so is the Job's name: a rerun of the flow finds the results
of a finished evaluation and runs nothing, and reattaches to an evaluation Job still running.
"""

from __future__ import annotations

from typing import Any

from mardini.config import CurriculumConfig
from pipelines.launchers.batch_job import build_job
from pipelines.launchers.pytorchjob import LaunchConfig, dns_label


def eval_command(
    config_path: str, stage: str, export: str, out: str, data: str, run_id: str | None
) -> list[str]:
    """The command an evaluation runs, locally and in its Job."""
    words = ["python", "-m", "mardini.eval.job", "--config", config_path, "--stage", stage]
    words += ["--export", export, "--out", out, "--data", data]
    return words + (["--run-id", run_id] if run_id else [])


def eval_job_name(curriculum: str, stage: str, key: str) -> str:
    """``{curriculum}-{stage}-eval-{key}``, a DNS label (63 characters at most)."""
    return f"{dns_label(f'{curriculum}-{stage}', max_len=63 - 6 - len(key[:8]))}-eval-{key[:8]}"


def build_eval_job(
    cfg: CurriculumConfig,
    stage: str,
    command: list[str],
    key: str,
    run_id: str | None = None,
    launch: LaunchConfig | None = None,
) -> Any:
    """The ``batch/v1`` Job of one evaluation, on one GPU (``batch_job.build_job``)."""
    name = eval_job_name(cfg.name, stage, key)
    return build_job(cfg, stage, command, name, "evaluation", run_id, launch)
