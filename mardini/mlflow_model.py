"""A stage's final weights as an MLflow ``pyfunc`` model whose ``predict`` generates video.

``log_model(final_url)`` logs ``final/`` (``model.safetensors`` + ``config.json``) as the
artifact ``final`` of a pyfunc model and, given ``registered_model_name``, registers it as a new
version (``register_model`` also moves aliases and returns the version); then
``mlflow.pyfunc.load_model("models:/name@alias")``, ``mlflow models serve -m models:/name@alias
--env-manager local`` and ``mardini.generate.load_model("models:/name@alias")`` all work. The
model's code is the installed ``mardini`` package (serve it from the project's environment or
image: ``--env-manager local``).

``predict`` input: a dict (one request), a list of dicts, or a pandas DataFrame (one request per
row) with
- ``task``: ``interpolate`` | ``i2v`` | ``expand`` | ``long``;
- ``first`` and ``last`` (interpolate), ``image`` (i2v, long), ``video`` (expand): a base64
  string of the file's bytes (PNG/JPEG, mp4), a uint8 array (``H W 3`` image, ``T H W 3``
  video), or, in-process only, a ``pathlib.Path`` (strings are never read as paths, so a
  client of ``mlflow models serve`` cannot make the server read its files);
- ``frames`` (interpolate, i2v: total frames), ``add`` (expand), ``window`` and ``total`` (long);
- optional ``size``, ``steps``, ``seed``, ``cfg_scale``, ``window`` (expand), and ``format``.
Output: one uint8 array ``T H W 3`` per request, or with ``"format": "mp4"`` one base64 string
of an H.264 mp4 (handy behind ``mlflow models serve``). ``format`` is a request field, not a
``params`` entry: a pyfunc without a params schema drops ``params``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.metadata
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from mardini.storage import filesystem

log = logging.getLogger(__name__)

TASKS = ("interpolate", "i2v", "expand", "long")
# What the model's code imports at run time, pinned to the versions installed here.
RUNTIME_PACKAGES = (
    "torch",
    "numpy",
    "einops",
    "pydantic",
    "safetensors",
    "fsspec",
    "av",
    "pillow",
    "pyyaml",
    "pandas",
    "mlflow",
)


def pip_requirements() -> list[str]:
    """Pinned requirements of the installed runtime packages (no resolver, no network)."""
    pins = []
    for name in RUNTIME_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{name}=={importlib.metadata.version(name)}")
    return pins


def _tensor_video(value: Any, size: int, image: bool) -> torch.Tensor:
    """An image (``3 H W``) or video (``T 3 H W``) in [-1, 1] from base64, an array or a Path."""
    from mardini.generate import read_clip, read_image
    from mardini.video import resize_center_crop

    if isinstance(value, np.ndarray | list):
        array = np.asarray(value, dtype=np.uint8)
        if array.ndim != (3 if image else 4) or array.shape[-1] != 3:
            want = "H W 3" if image else "T H W 3"
            raise ValueError(f"expected a uint8 array {want}, got shape {array.shape}")
        frames = torch.from_numpy(array.copy()).float() / 127.5 - 1.0
        frames = frames.reshape(-1, *array.shape[-3:]).permute(0, 3, 1, 2)
        frames = resize_center_crop(frames, size)
        return frames[0] if image else frames
    if isinstance(value, Path):
        return read_image(value, size) if image else read_clip(value, size)
    if not isinstance(value, str):
        raise ValueError(f"expected a base64 string, uint8 array or Path, got {type(value)}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(
            f"input {value[:60]!r} is not base64-encoded file bytes (strings are never read as "
            "paths; pass a pathlib.Path in-process)"
        ) from err
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("input.img" if image else "input.mp4")
        path.write_bytes(data)
        return read_image(path, size) if image else read_clip(path, size)


def _requests(model_input: Any) -> Iterator[dict[str, Any]]:
    """One dict per request from a dict, a list of dicts or a DataFrame."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        for record in model_input.to_dict(orient="records"):
            yield {k: v for k, v in record.items() if not _is_missing(v)}
    elif isinstance(model_input, dict):
        yield model_input
    elif isinstance(model_input, list):
        yield from model_input
    else:
        raise ValueError(
            f"predict takes a dict, a list of dicts or a DataFrame, got {type(model_input)}"
        )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _need(request: dict[str, Any], key: str) -> Any:
    if key not in request:
        raise ValueError(f"task {request.get('task')!r} needs {key!r}; got keys {sorted(request)}")
    return request[key]


class MarDiniModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: ``load_context`` loads the ``final`` artifact, ``predict`` generates."""

    def load_context(self, context) -> None:
        """Build the model from ``artifacts/final`` (GPU if there is one)."""
        from mardini.generate import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_model(context.artifacts["final"], device=device)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list:
        """Generate one clip per request; see the module docstring for the input format."""
        return [self._one(request) for request in _requests(model_input)]

    def _one(self, request: dict[str, Any]) -> Any:
        from mardini import generate as g
        from mardini.video import to_uint8

        task, fmt = request.get("task"), request.get("format", "array")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if fmt not in ("array", "mp4"):
            raise ValueError(f"format must be 'array' or 'mp4', got {fmt!r}")
        size = int(request.get("size") or g.stage_setting(self.meta, "resolution", 32))
        opts = g.SampleOptions(
            steps=int(request.get("steps", 25)),
            seed=int(request.get("seed", 0)),
            cfg_scale=float(request.get("cfg_scale", 1.0)),
            kind=g.sample_kind(self.meta),
        )
        if task == "interpolate":
            first = _tensor_video(_need(request, "first"), size, image=True)
            last = _tensor_video(_need(request, "last"), size, image=True)
            video = g.interpolate(self.model, first, last, int(_need(request, "frames")), opts)
        elif task == "i2v":
            image = _tensor_video(_need(request, "image"), size, image=True)
            video = g.image_to_video(self.model, image, int(_need(request, "frames")), opts)
        elif task == "expand":
            clip = _tensor_video(_need(request, "video"), size, image=False)
            window = request.get("window")
            video = g.expand(
                self.model,
                clip,
                int(_need(request, "add")),
                int(window) if window else None,
                opts,
            )
        else:
            image = _tensor_video(_need(request, "image"), size, image=True)
            video = g.long_video(
                self.model, image, int(_need(request, "window")), int(_need(request, "total")), opts
            )
        if fmt == "array":
            return to_uint8(video)
        with tempfile.TemporaryDirectory() as tmp:
            path = g.save_video(video, Path(tmp) / "out.mp4")[0]
            return base64.b64encode(path.read_bytes()).decode()


def _local_final(final_url: str, tmp: str) -> str:
    """A local copy of a ``final/`` export (fetched from the store if it is remote)."""
    fs, path = filesystem(final_url)
    if not fs.exists(f"{path}/config.json"):
        raise FileNotFoundError(
            f"no finished export at {final_url} (config.json missing): train that stage first"
        )
    if "://" not in final_url or final_url.startswith("file://"):
        return path
    local = Path(tmp) / "final"
    local.mkdir()
    for name in ("model.safetensors", "config.json"):
        fs.get_file(f"{path}/{name}", str(local / name))
    return str(local)


def experiment_id(client, name: str) -> str:
    """Find or create experiment ``name``; with a SQLite store, artifacts go beside the file."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = client.tracking_uri
    artifacts = (
        Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        if uri.startswith("sqlite:///")
        else None
    )
    return client.create_experiment(name, artifact_location=artifacts)


def log_model(
    final_url: str,
    registered_model_name: str | None = None,
    name: str = "model",
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log ``final/`` as a pyfunc model under artifact path ``name`` of ``run_id`` (else of a new
    run ``model-{stage}`` in the curriculum's experiment) and, given ``registered_model_name``,
    register it as a new version. Returns ``models:/name/version`` when registered, else
    ``runs:/run_id/name``. Uses ``MlflowClient`` only: no global MLflow state is changed."""
    from mlflow.tracking import MlflowClient

    # registry_uri too: MLflow 3 resolves a client's registry from the *global* default
    # (sqlite:///mlflow.db in the cwd), not from the tracking_uri given (seen here: `make demo`
    # registered into ./mlflow.db and then could not find models:/mardini-tiny@champion).
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_final(final_url, tmp)
        meta = json.loads(Path(local, "config.json").read_text())
        saved = Path(tmp) / "pyfunc"
        mlflow.pyfunc.save_model(
            str(saved),
            python_model=MarDiniModel(),
            artifacts={"final": local},
            pip_requirements=pip_requirements(),
            metadata={"source": final_url, "stage": meta.get("stage"), "kind": meta.get("kind")},
        )
        own_run = run_id is None
        if own_run:
            run_id = client.create_run(
                experiment_id(client, meta.get("curriculum") or "mardini-models"),
                run_name=f"model-{meta.get('stage', 'final')}",
                tags={"stage": str(meta.get("stage")), "source": final_url},
            ).info.run_id
        client.log_artifacts(run_id, str(saved), name)
        if own_run:
            client.set_terminated(run_id)
    uri = f"runs:/{run_id}/{name}"
    if registered_model_name:
        version = _register(client, registered_model_name, run_id, name)
        uri = f"models:/{registered_model_name}/{version}"
    log.info("logged %s as MLflow model %s", final_url, uri)
    return uri


def _register(client, model_name: str, run_id: str, name: str) -> str:
    """A new version of registered model ``model_name`` from the run's artifact ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{name}"
    return str(client.create_model_version(model_name, source, run_id=run_id).version)


def register_model(
    final_url: str,
    registered_model_name: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    aliases: tuple[str, ...] = (),
) -> str:
    """``log_model`` + register; points ``aliases`` at the new version and returns it."""
    from mlflow.tracking import MlflowClient

    uri = log_model(final_url, registered_model_name, run_id=run_id, tracking_uri=tracking_uri)
    version = uri.rsplit("/", 1)[1]
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for alias in aliases:
        client.set_registered_model_alias(registered_model_name, alias, version)
    return version
