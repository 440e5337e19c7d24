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
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

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


class RequestError(MlflowException, ValueError):
    """A request the model cannot serve; the message names the field. HTTP 400 when served
    (MLflow's scoring server shows an ``MlflowException``'s message, not only its trace)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# Fields of a request: every task's, then each task's required and optional ones.
COMMON_FIELDS = ("task", "size", "steps", "seed", "cfg_scale", "format")
TASK_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "interpolate": (("first", "last", "frames"), ()),
    "i2v": (("image", "frames"), ()),
    "expand": (("video", "add"), ("window",)),
    "long": (("image", "window", "total"), ()),
}
# Integer fields and their smallest value.
INTEGER_FIELDS = {"frames": 2, "add": 1, "window": 2, "total": 2, "size": 8, "steps": 1, "seed": 0}
MEDIA_FIELDS = {"first": True, "last": True, "image": True, "video": False}  # field -> is image


def _requests(model_input: Any) -> Iterator[dict[str, Any]]:
    """One dict per request from a dict, a list of dicts or a DataFrame.

    Also the shapes MLflow's scoring server hands over: ``{"inputs": {...}}`` arrives as a dict
    of 0-d arrays, ``{"inputs": [{...}]}`` as a list of those, ``{"instances": [...]}`` as a
    dict of columns, ``{"dataframe_records": [...]}`` as a DataFrame."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        for record in model_input.to_dict(orient="records"):
            yield {k: v for k, v in record.items() if not _is_missing(v)}
    elif isinstance(model_input, dict):
        task = model_input.get("task")
        if isinstance(task, np.ndarray) and task.ndim == 1:  # columns, one row a request
            columns = {
                k: list(v) if isinstance(v, np.ndarray) else v for k, v in model_input.items()
            }
            lengths = {k: len(v) for k, v in columns.items() if isinstance(v, list)}
            if set(lengths.values()) != {len(task)}:
                raise RequestError(f"columns of unequal length: {lengths}")
            for i in range(len(task)):
                yield {k: v[i] for k, v in columns.items()}
        else:
            yield model_input
    elif isinstance(model_input, list):
        yield from model_input
    else:
        raise RequestError(
            f"predict takes a dict, a list of dicts or a DataFrame, got {type(model_input)}"
        )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _plain(value: Any) -> Any:
    """A 0-d array or numpy scalar as the Python value it holds; anything else unchanged."""
    if isinstance(value, np.ndarray) and value.ndim == 0 or isinstance(value, np.generic):
        return value.item()
    return value


def parse_request(raw: Any, index: int = 0) -> dict[str, Any]:
    """Check one request and return it with plain Python values; ``RequestError`` names the
    field that is missing, unknown or wrong."""
    where = f"request {index}: " if index else ""
    if not isinstance(raw, dict):
        raise RequestError(
            f"{where}expected an object with a 'task' field, got {type(raw).__name__}"
        )
    request = {str(k): _plain(v) for k, v in raw.items()}
    task = request.get("task")
    if task is None:
        raise RequestError(f"{where}missing field 'task' (one of {', '.join(TASKS)})")
    if task not in TASK_FIELDS:
        raise RequestError(f"{where}field 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    required, optional = TASK_FIELDS[task]
    allowed = (*COMMON_FIELDS, *required, *optional)
    unknown = sorted(set(request) - set(allowed))
    if unknown:
        raise RequestError(
            f"{where}unknown field {', '.join(map(repr, unknown))} for task {task!r}; "
            f"its fields are {', '.join(allowed)}"
        )
    for key in required:
        if key not in request:
            raise RequestError(f"{where}task {task!r} needs field {key!r}")
    for key, least in INTEGER_FIELDS.items():
        if key in request:
            request[key] = _integer(request[key], key, least, where)
    if task == "interpolate" and request["frames"] < 3:
        raise RequestError(
            f"{where}field 'frames': interpolation needs at least 3, got {request['frames']}"
        )
    if "cfg_scale" in request:
        value = request["cfg_scale"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(f"{where}field 'cfg_scale': expected a number, got {value!r}")
        request["cfg_scale"] = float(value)
    if request.setdefault("format", "array") not in ("array", "mp4"):
        raise RequestError(
            f"{where}field 'format' must be 'array' or 'mp4', got {request['format']!r}"
        )
    return request


def _integer(value: Any, key: str, least: int, where: str) -> int:
    """``value`` as an integer of at least ``least``, or a ``RequestError`` naming ``key``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{where}field {key!r}: expected an integer, got {value!r}")
    if value < least:
        raise RequestError(f"{where}field {key!r}: must be at least {least}, got {value}")
    return value


class MarDiniModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: ``load_context`` loads the ``final`` artifact, ``predict`` generates."""

    def load_context(self, context) -> None:
        """Build the model from ``artifacts/final`` (GPU if there is one)."""
        from mardini.generate import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_model(context.artifacts["final"], device=device)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list:
        """Generate one clip per request; see the module docstring for the input format."""
        requests = [parse_request(r, i) for i, r in enumerate(_requests(model_input))]
        return [self._one(request) for request in requests]

    def _one(self, request: dict[str, Any]) -> Any:
        from mardini import generate as g
        from mardini.video import to_uint8

        task, fmt = request["task"], request["format"]
        size = int(request.get("size") or g.stage_setting(self.meta, "resolution", 32))
        opts = g.SampleOptions(
            steps=request.get("steps", 25),
            seed=request.get("seed", 0),
            cfg_scale=request.get("cfg_scale", 1.0),
            kind=g.sample_kind(self.meta),
        )
        media = {
            key: _field_video(request[key], key, size) for key in MEDIA_FIELDS if key in request
        }
        try:
            if task == "interpolate":
                video = g.interpolate(
                    self.model, media["first"], media["last"], request["frames"], opts
                )
            elif task == "i2v":
                video = g.image_to_video(self.model, media["image"], request["frames"], opts)
            elif task == "expand":
                video = g.expand(
                    self.model, media["video"], request["add"], request.get("window"), opts
                )
            else:
                video = g.long_video(
                    self.model, media["image"], request["window"], request["total"], opts
                )
        except ValueError as err:  # what generation refuses is the request's doing
            raise RequestError(f"task {task!r}: {err}") from err
        if fmt == "array":
            return to_uint8(video)
        with tempfile.TemporaryDirectory() as tmp:
            path = g.save_video(video, Path(tmp) / "out.mp4")[0]
            return base64.b64encode(path.read_bytes()).decode()


def _field_video(value: Any, key: str, size: int) -> torch.Tensor:
    """The image or video of request field ``key``; a bad one is a ``RequestError`` naming it."""
    try:
        return _tensor_video(value, size, image=MEDIA_FIELDS[key])
    except (ValueError, OSError) as err:
        raise RequestError(f"field {key!r}: {err}") from err


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
    """Find or create experiment ``name`` (``ensure_experiment``: tagged, artifacts beside a
    SQLite store)."""
    from mardini.train.tracking import ensure_experiment

    return ensure_experiment(name, uri=client.tracking_uri)


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
