"""A stage's final weights as an MLflow ``pyfunc`` model whose ``predict`` generates video.

**By reference.** ``log_model(final_url)`` logs a small pyfunc model (its ``MLmodel``, the
request schema and an input example) whose ``model_config`` names the stage's export in the
store (``final_url``) and the SHA-256 of its weights; no copy of the weights goes to MLflow.
Given ``registered_model_name`` it registers a new version (``register_model`` also moves
aliases). ``mlflow.pyfunc.load_model("models:/name@alias")``, ``mlflow models serve -m
models:/name@alias --env-manager local`` and ``mardini.export.load_model("models:/name@alias")``
read the weights from the store (so they need the store's credentials, as training does). A
stage retrained later writes other weights to the same URL; the export it replaces is kept in
``superseded/`` beside it (``mardini.export.export_final``), so every version keeps
loading the weights it was registered with. Versions logged before this (with a ``final``
artifact) still load. The model's code is the installed ``mardini`` package (serve it from the
project's environment or image: ``--env-manager local``).

``predict`` input: a list of requests (``{"inputs": [{...}, ...]}`` when served) or a pandas
DataFrame (one request per row); each request has
- ``task``: ``interpolate`` | ``i2v`` | ``expand`` | ``long``;
- ``first`` and ``last`` (interpolate), ``image`` (i2v, long), ``video`` (expand): a base64
  string of the file's bytes (PNG/JPEG, mp4), a uint8 array (``H W 3`` image, ``T H W 3``
  video), or, in-process only, a ``pathlib.Path`` (strings are never read as paths, so a
  client of ``mlflow models serve`` cannot make the server read its files);
- ``frames`` (interpolate, i2v: total frames), ``add`` (expand), ``window`` and ``total`` (long);
- optional ``size``, ``steps``, ``seed``, ``cfg_scale``, ``window`` (expand), and ``format``;
  ``steps`` and ``cfg_scale`` default to the sampler the model was evaluated and gated with.
The schema (``Request``) is the model's signature, shown on the registry page. MLflow checks
each field's type; ``parse_request`` then names a missing, unknown or out-of-range field (HTTP
400 when served). Output: one uint8 array ``T H W 3`` per request, or with ``"format": "mp4"``
one base64 string of an H.264 mp4 (handy behind ``mlflow models serve``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.metadata
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pydantic
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mardini.mlflow_setup import mlflow_client
from mardini.storage import is_local_url

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
    from mardini.video import read_clip, read_image, resize_center_crop

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


class Request(pydantic.BaseModel):
    """One generation request: the model's signature (MLflow infers it from ``predict``'s type
    hint and checks each field's type). Which fields a task needs is ``parse_request``'s check;
    unknown fields are let through to it, so its 400 names them."""

    model_config = pydantic.ConfigDict(extra="allow")

    task: str
    first: Any = None
    last: Any = None
    image: Any = None
    video: Any = None
    frames: int | None = None
    add: int | None = None
    window: int | None = None
    total: int | None = None
    size: int | None = None
    steps: int | None = None
    seed: int | None = None
    cfg_scale: float | None = None
    format: str | None = None


def _fields(request: Any) -> dict[str, Any]:
    """The fields a request set, as a dict (a ``Request``'s unset and missing ones dropped)."""
    if isinstance(request, pydantic.BaseModel):
        request = request.model_dump()
    if not isinstance(request, dict):
        return request
    return {k: v for k, v in request.items() if not _is_missing(v)}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def parse_request(raw: Any, index: int = 0) -> dict[str, Any]:
    """Check one request and return it with plain Python values; ``RequestError`` names the
    field that is missing, unknown or wrong."""
    where = f"request {index}: " if index else ""
    if not isinstance(raw, dict):
        raise RequestError(
            f"{where}expected an object with a 'task' field, got {type(raw).__name__}"
        )
    request = {str(k): v for k, v in raw.items()}
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


@contextlib.contextmanager
def _media_fields_untyped() -> Iterator[None]:
    """Silence MLflow's advice, when it infers the signature, that ``Any`` fields are not
    type-checked: the media fields are ``Any`` on purpose (base64 string, uint8 array or Path)
    and ``parse_request`` checks them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Any type hint is inferred as AnyType")
        yield


# True while ``save_reference`` saves a model (see ``_no_example_run``).
_SAVING = False


class _SavingOnly(RuntimeError):
    """``load_context`` called while the model is being saved, not served."""


@contextlib.contextmanager
def _no_example_run() -> Iterator[None]:
    """Keep MLflow from loading the model while saving it. Given type hints and an input example,
    ``save_model`` calls ``load_context`` and ``predict`` on the example to check the output:
    that would read the export's weights (14.4 GB at paper scale) and generate a clip in the
    flow's pod. Meanwhile ``load_context`` refuses at once; MLflow then keeps the output schema of
    the type hints (``list[Any]``), and its warning about the failed run is silenced here."""
    global _SAVING
    logger = logging.getLogger("mlflow.models.signature")
    level = logger.level
    _SAVING = True
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _SAVING = False
        logger.setLevel(level)


class MarDiniModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: ``load_context`` loads the export the model refers to, ``predict``
    generates."""

    def load_context(self, context) -> None:
        """Build the model from the export in the store (``model_config``) or, for versions
        logged with a copy, from ``artifacts/final`` (GPU if there is one)."""
        from mardini.export import load_model

        if _SAVING:
            raise _SavingOnly("the model is being saved: its weights are not loaded")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_model(_export_of(context), device=device)

    def predict(self, context, model_input: list[Request], params=None) -> list[Any]:
        """Generate one clip per request; see the module docstring for the input format."""
        requests = [parse_request(_fields(r), i) for i, r in enumerate(model_input)]
        return [self._one(request) for request in requests]

    def _one(self, request: dict[str, Any]) -> Any:
        from mardini import generate as g
        from mardini.export import stage_setting
        from mardini.video import save_video, to_uint8

        task, fmt = request["task"], request["format"]
        size = int(request.get("size") or stage_setting(self.meta, "resolution", 32))
        opts = g.options_for(
            self.meta,
            steps=request.get("steps"),
            cfg_scale=request.get("cfg_scale"),
            seed=request.get("seed", 0),
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
            path = save_video(video, Path(tmp) / "out.mp4")[0]
            return base64.b64encode(path.read_bytes()).decode()


def _field_video(value: Any, key: str, size: int) -> torch.Tensor:
    """The image or video of request field ``key``; a bad one is a ``RequestError`` naming it."""
    try:
        return _tensor_video(value, size, image=MEDIA_FIELDS[key])
    except (ValueError, OSError) as err:
        raise RequestError(f"field {key!r}: {err}") from err


def _export_of(context) -> str:
    """The export a loaded pyfunc model refers to (``model_config``), or its ``final`` artifact
    when it was logged with a copy of the weights (versions from before references)."""
    config = context.model_config or {}
    if "final_url" in config:
        from mardini.export import referenced_export

        return referenced_export(config["final_url"], config.get("weights_sha256"))
    return context.artifacts["final"]


def registered_export(model_uri: str, tracking_uri: str | None = None) -> str:
    """URL of the ``final/`` export that ``models:/name@alias`` (or ``models:/name/version``)
    refers to, reading only the version's ``MLmodel`` (a version holding a copy of the weights
    is downloaded). ``FileNotFoundError`` names the registry and what to check."""
    import mlflow
    from mlflow.models import Model

    uri = tracking_uri or mlflow.get_tracking_uri()
    try:
        # An explicit client (registry too, see mlflow_client): MLflow 3 resolves models:/ URIs
        # in the *global* default registry (./mlflow.db) otherwise (seen in 3.17: `make demo`
        # could not find its champion).
        client = mlflow_client(uri)
        name, _, ref = model_uri.removeprefix("models:/").partition("@")
        if ref:
            version = client.get_model_version_by_alias(name, ref).version
        else:
            name, _, version = name.partition("/")
        artifact = client.get_model_version_download_uri(name, str(version)).rstrip("/")
        mlmodel = Model.load(
            mlflow.artifacts.download_artifacts(f"{artifact}/MLmodel", tracking_uri=uri)
        )
        config = mlmodel.flavors.get("python_function", {}).get("config") or {}
        if "final_url" not in config:  # logged with a copy of the weights
            local = Path(mlflow.artifacts.download_artifacts(artifact, tracking_uri=uri))
    except Exception as err:
        raise FileNotFoundError(
            f"cannot load {model_uri} from the MLflow registry at {uri}: {err} (check the name "
            "and alias, or set MLFLOW_TRACKING_URI / --store)"
        ) from err
    if "final_url" in config:
        from mardini.export import referenced_export

        return referenced_export(config["final_url"], config.get("weights_sha256"))
    from mardini.export import WEIGHTS

    found = sorted(local.rglob(WEIGHTS))
    if not found:
        raise FileNotFoundError(f"{model_uri} holds no {WEIGHTS} (looked under {local})")
    return str(found[0].parent)


def _absolute(url: str) -> str:
    """``url`` with a local path made absolute, so the reference holds from any directory."""
    if not is_local_url(url):
        return url
    return str(Path(url.removeprefix("file://")).resolve())


def _example_png(rgb: tuple[int, int, int]) -> str:
    """A base64 PNG of a small solid image, for the model's input example."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def input_example() -> list[dict[str, Any]]:
    """The request shown on the registry page (and in ``serving_input_example.json``):
    interpolate 5 frames between two images, returned as an mp4."""
    return [
        {
            "task": "interpolate",
            "first": _example_png((200, 40, 40)),
            "last": _example_png((40, 40, 200)),
            "frames": 5,
            "steps": 10,
            "format": "mp4",
        }
    ]


def experiment_id(client, name: str) -> str:
    """Find or create experiment ``name`` (``ensure_experiment``: tagged, artifacts beside a
    SQLite store)."""
    from mardini.mlflow_setup import ensure_experiment

    return ensure_experiment(name, uri=client.tracking_uri)


def save_reference(final_url: str, path: str | Path) -> dict[str, Any]:
    """Save the pyfunc model that refers to the export at ``final_url`` to local ``path``: the
    reference (URL and weights digest) as its ``model_config``, the request schema as its
    signature, ``input_example()``; no weights. Returns the export's metadata."""
    from mardini.export import require_final_meta

    meta = require_final_meta(final_url)
    with _media_fields_untyped(), _no_example_run():
        mlflow.pyfunc.save_model(
            str(path),
            python_model=MarDiniModel(),
            model_config={
                "final_url": _absolute(final_url),
                "weights_sha256": meta.get("weights_sha256"),
            },
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            metadata={"source": final_url, "stage": meta.get("stage"), "kind": meta.get("kind")},
        )
    return meta


def log_model(
    final_url: str,
    registered_model_name: str | None = None,
    name: str = "model",
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log the export at ``final_url`` by reference as a pyfunc model under artifact path
    ``name`` of ``run_id`` (else of a new run ``model-{stage}`` in the curriculum's experiment)
    and, given ``registered_model_name``, register it as a new version. Reads only the export's
    metadata. Returns ``models:/name/version`` when registered, else
    ``runs:/run_id/name``. Uses ``MlflowClient`` only: no global MLflow state is changed."""
    client = mlflow_client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "pyfunc"
        meta = save_reference(final_url, saved)
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
    log.info("logged %s as MLflow model %s (by reference)", final_url, uri)
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
    uri = log_model(final_url, registered_model_name, run_id=run_id, tracking_uri=tracking_uri)
    version = uri.rsplit("/", 1)[1]
    client = mlflow_client(tracking_uri)
    for alias in aliases:
        client.set_registered_model_alias(registered_model_name, alias, version)
    return version
