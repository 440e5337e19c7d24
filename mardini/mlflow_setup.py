"""Where MLflow tracks to, and clients for it: the one place that sets MLflow up.

Embedded default: ``sqlite:///{store}/mlflow.db`` with artifacts under ``{store}/mlartifacts``
when the store is local; ``MLFLOW_TRACKING_URI`` points at a server instead. Values of keys
that look like credentials never become params.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from mardini.storage import is_local_url, store_root

log = logging.getLogger(__name__)

# The experiment tag that makes MLflow's UI open the model-training view (not the GenAI one).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.I)


def tracking_uri(store: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else SQLite under a local store (or ``./.mardini``)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = store_root(store)
    if not is_local_url(root):
        log.warning(
            "store %s is remote and MLFLOW_TRACKING_URI is unset: tracking to ./.mardini", root
        )
        root = "./.mardini"
    path = Path(root.removeprefix("file://")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}/mlflow.db"


def mlflow_client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for tracking and the registry at ``uri`` (default ``tracking_uri()``).

    The registry URI is given too: MLflow 3 takes a client's registry from the *global* default
    (``sqlite:///mlflow.db`` in the working directory), not from the tracking URI given."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(uri, registry_uri=uri)


def ensure_experiment(name: str, store: str | None = None, uri: str | None = None) -> str:
    """Create (or find) the experiment ``name``, tagged as a model-training experiment (an
    existing one gets the tag too); local artifacts live beside the SQLite file.

    Uses an explicit client: no global MLflow state changes (the flow runs many curricula)."""
    uri = uri or tracking_uri(store)
    client = mlflow_client(uri)
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
