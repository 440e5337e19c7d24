"""Checkpoints on any fsspec store, safe against torn writes, and consolidated exports.

Layout under ``{store}/runs/{curriculum}/{stage}/``:
``checkpoints/step-N/`` DeepSpeed ZeRO-3 files of every rank; ``checkpoints/latest`` the tag of
the newest *complete* checkpoint. The stage's consolidated export ``final/`` is
``mardini.export``'s.

Protocol: every rank saves into its own local directory and uploads its own files (each
transfer retried with backoff, ``mardini.storage.retry``); a barrier with an all-reduced
success flag confirms every upload; only then rank 0 writes ``latest``. A crash or a failed
upload anywhere before that leaves ``latest`` on the previous complete checkpoint, and the
partial ``step-N`` directory is ignored (and overwritten by the next save of that step). On
resume each rank downloads only its own ZeRO-3 files (``zero_pp_rank_{r}_*``): at 256 ranks
that is 1/256 of the checkpoint per rank, not all of it.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mardini.storage import filesystem, join, retry
from mardini.train.faults import fault_point

log = logging.getLogger(__name__)


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

    def _scratch(self) -> tempfile.TemporaryDirectory:
        """A local folder for one save or restore, removed after it whatever happens (a folder
        kept per manager was left behind in the temp dir by every stage of every run)."""
        return tempfile.TemporaryDirectory(
            prefix=f"mardini-ckpt-r{self.rank}-", ignore_cleanup_errors=True
        )

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
        with self._scratch() as local:
            self._save_and_upload(engine, state, tag, Path(local))
        self.last_saved = time.monotonic()
        log.info("checkpoint %s committed to %s", tag, self.root)
        return tag

    def _save_and_upload(self, engine, state: TrainState, tag: str, local: Path) -> None:
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
        remote = f"{self.path}/{tag}"
        listing = retry(lambda: self.fs.find(remote), f"listing {remote}")
        with self._scratch() as scratch:
            local = Path(scratch)
            (local / tag).mkdir()
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
