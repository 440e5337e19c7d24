"""MLflow tracking from rank 0: resolved config as params, metrics, artifacts, tags.

Embedded default: ``sqlite:///{store}/mlflow.db`` with artifacts under ``{store}/mlartifacts``
when the store is local; ``MLFLOW_TRACKING_URI`` points at a server instead. Values of keys
that look like credentials never become params.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from mardini.storage import store_root

log = logging.getLogger(__name__)

# The experiment tag that makes MLflow's UI open the model-training view (not the GenAI one).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)


def tracking_uri(store: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else SQLite under a local store (or ``./.mardini``)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = store_root(store)
    if "://" in root and not root.startswith("file://"):
        log.warning(
            "store %s is remote and MLFLOW_TRACKING_URI is unset: tracking to ./.mardini", root
        )
        root = "./.mardini"
    path = Path(root.removeprefix("file://")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}/mlflow.db"


def ensure_experiment(name: str, store: str | None = None, uri: str | None = None) -> str:
    """Create (or find) the experiment ``name``, tagged as a model-training experiment (an
    existing one gets the tag too); local artifacts live beside the SQLite file.

    Uses an explicit client: no global MLflow state changes (the flow runs many curricula)."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri(store)
    client = MlflowClient(uri)
    key, kind = EXPERIMENT_KIND
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(key) != kind:
            client.set_experiment_tag(experiment.experiment_id, key, kind)
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts, tags={key: kind})


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists to ``a.b.0.c`` -> str, dropping credential-looking keys."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if _SECRET.search(str(key)):
                continue
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list | tuple) and any(isinstance(v, dict | list) for v in data):
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = str(data)[:500]
    return out


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` flattened (keys within MLflow's 250 characters) in batches of 100."""
    from mlflow.entities import Param

    flat = [Param(k[:250], v) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[i : i + 100])


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
    """A run on rank 0; every method is a no-op on other ranks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None

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
        import mlflow

        uri = tracking_uri(store)
        mlflow.set_tracking_uri(uri)  # this process (one rank-0 trainer) logs to one store only
        experiment_id = ensure_experiment(experiment, store, uri)
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else experiment_id,
            run_name=run_name,
            tags=tags,
        )
        self.run_id = run.info.run_id
        return self.run_id

    def params(self, params: dict[str, Any]) -> None:
        """Log flattened params (batched; values already logged are skipped on resume)."""
        if not self.enabled:
            return
        import mlflow

        existing = mlflow.get_run(self.run_id).data.params
        flat = {k: v for k, v in flatten(params).items() if k not in existing}
        items = list(flat.items())
        for i in range(0, len(items), 90):
            mlflow.log_params(dict(items[i : i + 90]))

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log metrics at ``step``."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics(values, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Upload a local file as an artifact."""
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        """End the run."""
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)
