"""A trained stage's export, and loading a model from any source that names one.

An export is a directory ``final/`` (``mardini.layout.final_url``) holding the consolidated
fp32 weights ``model.safetensors`` and ``metadata.json`` (the model config, the stage and its
settings, the parts it trained, the weights' SHA-256), written last: its presence marks a
complete export. Exports written before 2026-12-05 name it ``config.json``; they still load.

A *source* names an export in one of three ways, the same everywhere (evaluation, generation,
serving, ``init_from``): the ``final/`` URL itself or the stage directory above it (local path
or fsspec URL), ``models:/name@alias`` / ``models:/name/version`` (the export a registered
version refers to), or, given the store and the curriculum, a stage name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mardini.config import ModelConfig
from mardini.layout import final_url
from mardini.storage import filesystem, join, retry

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
METADATA = "metadata.json"
# Older exports named their metadata config.json; read, never written.
_METADATA_NAMES = (METADATA, "config.json")


def export_final(state: dict[str, torch.Tensor], meta: dict[str, Any], stage_url: str) -> str:
    """Write ``final/model.safetensors`` and ``final/metadata.json``; returns the final URL.

    ``metadata.json`` records the weights' SHA-256 (``weights_sha256``): registered model versions
    refer to an export by URL and digest (``mardini.mlflow_model``). An export with other
    weights already at ``final/`` (the stage retrained with a new config) is first copied to
    ``superseded/{digest}/`` beside it, so the versions that refer to it keep loading."""
    final = join(stage_url, "final")
    fs, path = filesystem(final)
    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{tmp}/{WEIGHTS}"
        save_file({k: v.contiguous() for k, v in state.items()}, weights)
        meta = {**meta, "weights_sha256": file_sha256(weights)}
        Path(f"{tmp}/{METADATA}").write_text(json.dumps(meta, indent=2, sort_keys=True))
        _keep_superseded(final, meta["weights_sha256"])
        # The metadata last: its presence marks a complete export (its absence a torn one).
        for name in _METADATA_NAMES:
            if fs.exists(f"{path}/{name}"):
                fs.rm_file(f"{path}/{name}")
        fs.put_file(weights, f"{path}/{WEIGHTS}")
        fs.put_file(f"{tmp}/{METADATA}", f"{path}/{METADATA}")
    return final


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a local file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def superseded_url(final_url: str, sha256: str) -> str:
    """Where an export with weights ``sha256`` is kept once ``final_url`` holds other weights."""
    return join(final_url.rstrip("/").rsplit("/", 1)[0], "superseded", sha256[:16])


def _keep_superseded(final_url: str, new_sha256: str) -> None:
    """Copy the export at ``final_url`` to ``superseded/`` if it holds other (hashed) weights.
    A server-side copy on an object store: the weights do not pass through this process."""
    old = read_final_meta(final_url)
    old_sha = (old or {}).get("weights_sha256")
    if not old_sha or old_sha == new_sha256:
        return
    keep = superseded_url(final_url, old_sha)
    if read_final_meta(keep) is not None:
        return
    fs, src = filesystem(final_url)
    _, dst = filesystem(keep)
    for name in (WEIGHTS, _metadata_name(final_url)):  # the metadata last, as in an export
        retry(lambda n=name: fs.copy(f"{src}/{n}", f"{dst}/{n}"), f"copying {final_url}/{name}")
    log.info("kept the export replaced at %s as %s", final_url, keep)


def referenced_export(final_url: str, sha256: str | None) -> str:
    """The export with weights ``sha256`` that was written at ``final_url``: ``final_url`` itself
    while it still holds them, else its ``superseded/`` copy; FileNotFoundError if neither.
    Without a digest (an export written before they were recorded) ``final_url`` as it is."""
    if not sha256:
        if read_final_meta(final_url) is None:
            raise FileNotFoundError(_no_export(final_url))
        return final_url
    for url in (final_url, superseded_url(final_url, sha256)):
        meta = read_final_meta(url)
        if meta is not None and meta.get("weights_sha256") == sha256:
            return url
    raise FileNotFoundError(
        f"the export registered from {final_url} (weights sha256 {sha256[:16]}) is gone: that "
        f"URL now holds other weights and {superseded_url(final_url, sha256)} does not exist; "
        "register the stage's current export again, or restore the store"
    )


def _metadata_name(final_url: str) -> str:
    """The metadata file of the export at ``final_url`` (``metadata.json``, or an older
    export's ``config.json``); ``METADATA`` when there is none."""
    fs, path = filesystem(final_url)
    for name in _METADATA_NAMES:
        if retry(lambda n=name: fs.exists(f"{path}/{n}"), f"reading {final_url}"):
            return name
    return METADATA


def _no_export(url: str) -> str:
    return f"no finished export at {url} ({METADATA} missing): train that stage first"


def read_final_meta(final_url: str) -> dict[str, Any] | None:
    """The metadata of a complete export at ``final_url`` (written last), or None when there
    is none."""
    fs, path = filesystem(final_url)
    for name in _METADATA_NAMES:
        try:
            return json.loads(
                retry(lambda n=name: fs.cat_file(f"{path}/{n}"), f"reading {final_url}")
            )
        except FileNotFoundError:
            continue
    return None


def require_final_meta(final_url: str) -> dict[str, Any]:
    """``read_final_meta``, or FileNotFoundError saying the stage has no finished export."""
    meta = read_final_meta(final_url)
    if meta is None:
        raise FileNotFoundError(_no_export(final_url))
    return meta


def read_final(final_url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an exported ``final/`` directory (local or remote): weights and metadata. Weights
    whose digest differs from the one the metadata records (a torn or mixed export) are
    refused."""
    meta = require_final_meta(final_url)
    fs, path = filesystem(final_url)
    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{tmp}/{WEIGHTS}"
        retry(lambda: fs.get_file(f"{path}/{WEIGHTS}", weights), f"reading {final_url}")
        want = meta.get("weights_sha256")
        if want and file_sha256(weights) != want:
            raise ValueError(
                f"{final_url}/{WEIGHTS} does not match the sha256 its metadata records: the "
                "export is torn or mixed; export the stage again"
            )
        return load_file(weights), meta


def export_url(
    source: str,
    tracking_uri: str | None = None,
    store: str | None = None,
    curriculum: str | None = None,
) -> str:
    """URL of the ``final/`` export ``source`` names: ``models:/name@alias`` (the export its
    version refers to, in the registry at ``tracking_uri``); with ``store`` and ``curriculum``,
    a stage name of that curriculum (an ``init_from`` entry); else a final dir or the stage
    dir above it."""
    if source.startswith("models:/"):
        from mardini.mlflow_model import registered_export

        return registered_export(source, tracking_uri)
    if store is not None and curriculum is not None:
        return final_url(store, curriculum, source)
    if read_final_meta(source) is not None:
        return source
    if read_final_meta(join(source, "final")) is not None:
        return join(source, "final")
    raise FileNotFoundError(
        f"no checkpoint at {source}: expected a final/ export ({WEIGHTS} + {METADATA}), "
        "a stage directory holding final/, or models:/name@alias"
    )


def load_model(
    source: str, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model recorded in an export's metadata and load all its weights (eval mode)."""
    url = export_url(source, tracking_uri)
    state, meta = read_final(url)
    if "model" not in meta:
        raise ValueError(f"{url}: its metadata has no 'model' section; re-export the stage")
    from mardini.models import build_model

    model = build_model(ModelConfig.model_validate(meta["model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{url}: weights do not match the model its metadata names (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); was it exported by another version of mardini?"
        )
    meta = {**meta, "source": source, "final_url": url}
    log.info("loaded %s (stage %s, kind %s)", url, meta.get("stage"), meta.get("kind"))
    return model.to(device).eval(), meta


def stage_setting(meta: dict[str, Any], key: str, default: Any) -> Any:
    """A stage setting (``resolution``, ``frames``, ``fps``) recorded in the export, or default."""
    stage = meta.get("stage_config") or {}
    return stage.get(key, meta.get(key, default))


def sample_setting(meta: dict[str, Any], key: str, default: Any) -> Any:
    """A sampler setting (``steps``, ``solver``, ``cfg_scale``) the export's stage was evaluated
    and gated with (its curriculum's ``sample``), or default (exports from before it was kept)."""
    return (meta.get("sample") or {}).get(key, default)


def load_init(
    model: torch.nn.Module,
    sources: list[str],
    store: str,
    curriculum: str,
    only: tuple[str, ...] | None = None,
) -> list[str]:
    """Copy into ``model`` the parts each source trained, in order (of those, only the parts
    in ``only`` when given); returns what was loaded."""
    loaded = []
    for source in sources:
        url = export_url(source, store=store, curriculum=curriculum)
        state, meta = read_final(url)
        parts = tuple(meta.get("trained_parts", ()))
        if not parts:
            raise ValueError(
                f"{url}: its metadata lists no trained_parts; cannot tell what to load"
            )
        if only is not None:
            parts = tuple(p for p in parts if p in only)
            if not parts:
                continue
        picked = {k: v for k, v in state.items() if k.split(".", 1)[0] in parts}
        own = model.state_dict()
        missing = [k for k in own if k.split(".", 1)[0] in parts and k not in picked]
        if missing:
            raise ValueError(f"{url} lacks weights for {missing[:5]} (model changed since export?)")
        for key, value in picked.items():
            if key not in own or own[key].shape != value.shape:
                raise ValueError(
                    f"{url}: weight {key} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(own[key].shape) if key in own else 'no such weight'}"
                )
        model.load_state_dict(picked, strict=False)
        loaded.append(f"{source}: {', '.join(parts)}")
        log.info("initialised %s from %s", ", ".join(parts), url)
    return loaded


def stage_autoencoder(cfg: Any, stage: Any, store: str) -> torch.nn.Module:
    """The autoencoder stage ``stage`` of curriculum ``cfg`` trains with: built as the trainer
    builds the model (same seed, so a random KL init is the same), then loaded from whatever
    ``init_from`` source trained it. What the latent cache must encode with."""
    from mardini.autoencoder import build_autoencoder

    torch.manual_seed(cfg.seed)  # MarDini builds its autoencoder first: the same weights
    holder = torch.nn.Module()
    holder.autoencoder = build_autoencoder(cfg.model.autoencoder)
    load_init(holder, stage.init_from, store, cfg.name, only=("autoencoder",))
    return holder.autoencoder
