"""Checkpoints on any fsspec store, safe against torn writes, and consolidated exports.

Layout under ``{store}/runs/{curriculum}/{stage}/``:
``checkpoints/step-N/`` DeepSpeed ZeRO-3 files of every rank; ``checkpoints/latest`` the tag of
the newest *complete* checkpoint; ``final/model.safetensors`` + ``final/config.json``.

Protocol: every rank saves into its own local directory and uploads its own files (each
transfer retried with backoff, ``mardini.storage.retry``); a barrier with an all-reduced
success flag confirms every upload; only then rank 0 writes ``latest``. A crash or a failed
upload anywhere before that leaves ``latest`` on the previous complete checkpoint, and the
partial ``step-N`` directory is ignored (and overwritten by the next save of that step). On
resume each rank downloads only its own ZeRO-3 files (``zero_pp_rank_{r}_*``): at 256 ranks
that is 1/256 of the checkpoint per rank, not all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mardini.layout import final_url
from mardini.storage import filesystem, join, retry

log = logging.getLogger(__name__)


def fault_point(point: str) -> None:
    """Test hook: ``MARDINI_FAULT=<point>:<rank>`` SIGKILLs that rank at that point (e.g.
    ``after-upload:step-4:1``, ``step:3:0``); used by the crash/resume tests.
    ``MARDINI_FAULT_SIGNAL=TERM`` sends SIGTERM instead (a pod being stopped). The fault is one
    event: a worker group that torchrun restarted (``TORCHELASTIC_RESTART_COUNT`` > 0) runs on."""
    spec = os.environ.get("MARDINI_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    want, _, rank = spec.rpartition(":")
    if want == point and rank == os.environ.get("RANK", "0"):
        import signal

        sig = getattr(signal, f"SIG{os.environ.get('MARDINI_FAULT_SIGNAL', 'KILL')}")
        log.warning("fault injection: %s to rank %s at %s", sig.name, rank, point)
        os.kill(os.getpid(), sig)


@dataclass
class TrainState:
    """What a checkpoint restores besides the engine's own state (model, optimizer and LR
    schedule, in DeepSpeed's ZeRO-3 partitions): the step reached, the stage's MLflow run, and
    this rank's loader lanes (their data position and shuffle RNG, ``mardini.data.loader``).
    A step's noise, masks and augmentation are drawn from (seed, rank, step), so there is no
    other RNG state to save."""

    step: int = 0
    mlflow_run_id: str | None = None
    # lane -> lane state; the loader keeps it current as it hands out batches.
    loader: dict[int, Any] = field(default_factory=dict)


class CheckpointManager:
    """Save/resume DeepSpeed checkpoints to ``{stage_dir}/checkpoints`` on any fsspec store,
    every ``every`` steps and/or ``every_minutes`` minutes, at the last step, and when asked to
    stop; with the ``TrainState`` of each rank."""

    def __init__(
        self,
        stage_url: str,
        rank: int,
        world_size: int,
        keep: int = 2,
        every: int = 50,
        every_minutes: float | None = None,
    ):
        self.root = join(stage_url, "checkpoints")
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.every = every
        self.every_s = 60 * every_minutes if every_minutes else None
        self.last_saved = time.monotonic()
        self.fs, self.path = filesystem(self.root)
        self.local = Path(tempfile.mkdtemp(prefix=f"mardini-ckpt-r{rank}-"))

    def latest(self) -> str | None:
        """The tag (``step-N``) of the newest complete checkpoint, or None."""
        latest = f"{self.path}/latest"
        try:
            text = retry(lambda: self.fs.cat_file(latest), f"reading {latest}")
        except FileNotFoundError:
            return None
        return text.decode().strip() or None

    def start_clock(self) -> None:
        """Time-based checkpoints count from now (training starts; setting up does not count)."""
        self.last_saved = time.monotonic()

    def clock_due(self) -> bool:
        """Whether rank 0's clock says a time-based checkpoint is due (False on other ranks: the
        trainer shares rank 0's answer, since every rank must save the same steps)."""
        if self.rank != 0 or self.every_s is None:
            return False
        return time.monotonic() - self.last_saved >= self.every_s

    def due(self, step: int, last_step: int, stopping: bool = False, clock: bool = False) -> bool:
        """Whether to save after ``step``: its cadence, the last step, a stop, or the clock."""
        return step % self.every == 0 or step == last_step or stopping or clock

    def save(self, engine, state: TrainState) -> str:
        """Save every rank's shard and ``TrainState``, upload them, and commit ``latest`` once
        all ranks uploaded."""
        tag = f"step-{state.step}"
        local = self.local / "save"
        shutil.rmtree(local, ignore_errors=True)
        # DeepSpeed's client_state is written by rank 0 only: what differs between ranks (the
        # loader's lanes) goes beside each rank's partitions as rank_{rank}_state.json.
        shared = {"step": state.step, "mlflow_run_id": state.mlflow_run_id}
        engine.save_checkpoint(str(local), tag=tag, client_state=shared, save_latest=False)
        own = {"loader": state.loader}
        (local / tag / rank_state_name(self.rank)).write_text(json.dumps(own))
        ok = 1
        try:
            for file in sorted((local / tag).rglob("*")):
                if file.is_file():
                    remote = f"{self.path}/{tag}/{file.relative_to(local / tag)}"
                    retry(
                        lambda f=file, r=remote: self.fs.put_file(str(f), r),
                        f"upload of {remote}",
                    )
        except Exception:
            log.exception("rank %d could not upload checkpoint %s to %s", self.rank, tag, self.root)
            ok = 0
        fault_point(f"after-upload:{tag}")
        flag = torch.tensor([ok], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag) != 1:
            raise RuntimeError(
                f"checkpoint {tag} incomplete on {self.root}: a rank failed to upload"
            )
        if self.rank == 0:
            fault_point(f"before-latest:{tag}")
            retry(
                lambda: self.fs.pipe_file(f"{self.path}/latest", tag.encode()),
                f"writing {self.path}/latest",
            )
            self._prune(state.step)
        dist.barrier()
        shutil.rmtree(local, ignore_errors=True)
        self.last_saved = time.monotonic()
        log.info("checkpoint %s committed to %s", tag, self.root)
        return tag

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; delete older (and torn) step dirs."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return
        steps = sorted(
            int(name.rsplit("-", 1)[1])
            for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
            if name.startswith("step-") and name.rsplit("-", 1)[1].isdigit()
        )
        keep = [s for s in steps if s <= step][-self.keep :]
        for s in steps:
            if s not in keep and s < step:
                self.fs.rm(f"{self.path}/step-{s}", recursive=True)

    def restore(self, engine, tag: str) -> TrainState:
        """Download this rank's files of checkpoint ``tag``, load model, optimizer and LR
        schedule into ``engine``, and return the ``TrainState`` saved with them."""
        local = self.local / "load"
        shutil.rmtree(local, ignore_errors=True)
        (local / tag).mkdir(parents=True)
        remote = f"{self.path}/{tag}"
        listing = retry(lambda: self.fs.find(remote), f"listing {remote}")
        for file in rank_files(listing, self.rank, self.world_size, remote):
            target = local / tag / file[len(remote) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            retry(lambda f=file, t=target: self.fs.get_file(f, str(t)), f"download of {file}")
        path, shared = engine.load_checkpoint(str(local), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {remote}")
        own_file = local / tag / rank_state_name(self.rank)
        # Checkpoints written before rank states existed have none: the loader then replays.
        own = json.loads(own_file.read_text()) if own_file.exists() else {}
        shutil.rmtree(local, ignore_errors=True)
        shared = shared or {}
        return TrainState(
            step=int(shared["step"]),
            mlflow_run_id=shared.get("mlflow_run_id"),
            loader={int(k): v for k, v in own.get("loader", {}).items()},
        )


def rank_files(listing: list[str], rank: int, world_size: int, where: str) -> list[str]:
    """The files of a ZeRO-3 checkpoint that ``rank`` loads: its own model and optimizer
    partitions (``zero_pp_rank_{rank}_*``). A checkpoint written by another number of ranks
    cannot be loaded partition by partition: that is refused, saying what to do."""
    name = lambda f: f.rstrip("/").rsplit("/", 1)[-1]  # noqa: E731
    model_files = [f for f in listing if re.fullmatch(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt", name(f))]  # fmt: skip
    if len(model_files) != world_size:
        raise RuntimeError(
            f"checkpoint {where} was written by {len(model_files)} ranks and this job has "
            f"{world_size}: ZeRO-3 partitions do not move between world sizes. Resume with "
            f"{len(model_files)} ranks, or convert it (DeepSpeed's ds_to_universal, then "
            "load_universal_checkpoint) before resuming on another number of ranks."
        )
    own = re.compile(rf"(bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_(model|optim)_states\.pt")
    return sorted(f for f in listing if own.fullmatch(name(f)) or name(f) == rank_state_name(rank))


def rank_state_name(rank: int) -> str:
    """The file of a checkpoint that holds ``rank``'s own part of its ``TrainState``."""
    return f"rank_{rank}_state.json"


def export_final(state: dict[str, torch.Tensor], meta: dict[str, Any], stage_url: str) -> str:
    """Write ``final/model.safetensors`` and ``final/config.json``; returns the final URL.

    ``config.json`` records the weights' SHA-256 (``weights_sha256``): registered model versions
    refer to an export by URL and digest (``mardini.mlflow_model``). An export with other
    weights already at ``final/`` (the stage retrained with a new config) is first copied to
    ``superseded/{digest}/`` beside it, so the versions that refer to it keep loading."""
    final = join(stage_url, "final")
    fs, path = filesystem(final)
    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{tmp}/model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, weights)
        meta = {**meta, "weights_sha256": file_sha256(weights)}
        Path(f"{tmp}/config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        _keep_superseded(final, meta["weights_sha256"])
        # config.json last: its presence marks a complete export (and its absence a torn one).
        if fs.exists(f"{path}/config.json"):
            fs.rm_file(f"{path}/config.json")
        fs.put_file(weights, f"{path}/model.safetensors")
        fs.put_file(f"{tmp}/config.json", f"{path}/config.json")
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
    for name in ("model.safetensors", "config.json"):  # config.json last, as in an export
        retry(lambda n=name: fs.copy(f"{src}/{n}", f"{dst}/{n}"), f"copying {final_url}/{name}")
    log.info("kept the export replaced at %s as %s", final_url, keep)


def referenced_export(final_url: str, sha256: str | None) -> str:
    """The export with weights ``sha256`` that was written at ``final_url``: ``final_url`` itself
    while it still holds them, else its ``superseded/`` copy; FileNotFoundError if neither.
    Without a digest (an export written before they were recorded) ``final_url`` as it is."""
    if not sha256:
        if read_final_meta(final_url) is None:
            raise FileNotFoundError(f"no finished export at {final_url} (config.json missing)")
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


def read_final_meta(final_url: str) -> dict[str, Any] | None:
    """The metadata of a complete export at ``final_url`` (its config.json, written last), or
    None when there is none."""
    fs, path = filesystem(final_url)
    try:
        return json.loads(retry(lambda: fs.cat_file(f"{path}/config.json"), f"reading {final_url}"))
    except FileNotFoundError:
        return None


def read_final(final_url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an exported ``final/`` directory (local or remote): weights and metadata. Weights
    whose digest differs from the one ``config.json`` records (a torn or mixed export) are
    refused."""
    meta = read_final_meta(final_url)
    if meta is None:
        raise FileNotFoundError(
            f"no finished export at {final_url} (config.json missing): train that stage first"
        )
    fs, path = filesystem(final_url)
    with tempfile.TemporaryDirectory() as tmp:
        weights = f"{tmp}/model.safetensors"
        retry(lambda: fs.get_file(f"{path}/model.safetensors", weights), f"reading {final_url}")
        want = meta.get("weights_sha256")
        if want and file_sha256(weights) != want:
            raise ValueError(
                f"{final_url}/model.safetensors does not match the sha256 its config.json "
                "records: the export is torn or mixed; export the stage again"
            )
        return load_file(weights), meta


def resolve_init_source(source: str, store: str, curriculum: str) -> str:
    """URL of the ``final/`` export an ``init_from`` entry names (stage name or models:/ URI)."""
    if source.startswith("models:/"):
        from mardini.mlflow_model import registered_export

        return registered_export(source)
    return final_url(store, curriculum, source)


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
        url = resolve_init_source(source, store, curriculum)
        state, meta = read_final(url)
        parts = tuple(meta.get("trained_parts", ()))
        if not parts:
            raise ValueError(f"{url}/config.json lists no trained_parts; cannot tell what to load")
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
