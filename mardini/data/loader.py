"""Streaming train and validation loaders over WebDataset shards (local or ``s3://``).

Shapes: B batch, T frames, C = 3 channels, H = W = the stage resolution; values in [-1, 1].

Across the worker boundary: DataLoader workers decode and hand over ``FrameBatch`` (uint8
frames at the clips' own size, a quarter of the bytes of float32); the process that trains
turns them into a ``Batch`` (floats in [-1, 1] at the stage resolution, on its device when it
passes one), bit-identical to decoding there. A worker's batches wait in shared memory
(``/dev/shm``) until taken: ``shm_bytes`` is the most they hold, and the trainer calls
``check_shm`` before any rank starts a worker, refusing a budget that does not fit.

Training stream: deterministic, endless, resumable
--------------------------------------------------
Each rank owns a fixed number of *lanes* (``lanes``, default 8), independent of the number of
DataLoader workers. A lane is an endless stream of raw (undecoded) samples: its shards, in a
fresh permutation every epoch, pass through a shuffle buffer; both orders come from RNGs seeded
by ``(seed, rank, world_size, lane, epoch)``. The batch of global step ``s`` is the
``s // lanes``-th group of ``micro_batch`` samples of lane ``s % lanes``; the window each clip
is cut at comes from an RNG seeded by ``(seed, rank, world_size, step, item)``.

Guarantee: for fixed shards, clip spec, ``micro_batch``, ``shuffle_buffer`` and ``lanes``, the
batch of step ``s`` is a pure function of ``(seed, rank, world_size, s)``. So a job resumed with
``start_step=k`` yields exactly the batches an uninterrupted stream yields from step ``k`` on,
with any number of workers (0, 2, ... even a different count than before), because worker
``w`` of ``W`` computes steps ``k + w, k + w + W, ...`` and torch's DataLoader hands batches
out round-robin from worker 0. Workers are cheapest when they divide ``lanes`` (then no two
workers read the same lane).

Resume cost: every training batch carries its lane's state (``lane_state``: the shuffle
buffer as sample references, the RNG state and the read cursor), which the trainer keeps in
its checkpoint. Given those states, a resumed lane reads its buffered samples again (at most
``shuffle_buffer``) and seeks to its cursor, passing earlier samples of a shard by their tar
headers: the work does not grow with the step. Without them (a checkpoint from before they
were saved) a lane reads, but never decodes, every sample before step ``k``.

Ranks get disjoint shards (``shards[rank::world_size]``) when there are at least
``world_size`` of them, and lanes split a rank's shards the same way when it has at least
``lanes`` of them, so that a rank reads each of its samples once per epoch (evenly when the
shard count is a multiple of ``world_size * lanes``). With fewer shards, ranks or lanes share
shards and differ only by their seeds.

Latent caches (``mardini/data/latents.py``) stream the same way: a latent sample carries every
frame of its clip, so the same seeded window is cut from it; batches are then ``LatentBatch``
(``keys``, ``latents`` = ``(hi, lo)``) instead of ``Batch`` (``keys``, ``video``).

Validation: the split is read exactly once, in shard and tar order, without shuffling. Shards
are dealt round-robin to the ``world_size * workers`` readers; with fewer shards than readers,
samples are dealt instead. Either way the readers together cover the split exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mardini.data.clips import (
    ClipSpec,
    RawSample,
    clip_info,
    decode_frames,
    frames_to_video,
    window_starts,
)
from mardini.data.latents import decode_latents, is_latent_sample
from mardini.data.shards import list_shards, shard_samples

log = logging.getLogger(__name__)

DEFAULT_LANES = 8
SHM_PATH = "/dev/shm"


class Batch(NamedTuple):
    """A batch of clips from mp4 shards and the shard keys they came from."""

    keys: list[str]
    video: torch.Tensor  # B T 3 H W in [-1, 1]
    # Training batches: (lane, that lane's state after this batch), what a checkpoint keeps.
    lane_state: tuple[int, dict] | None = None

    @property
    def inputs(self) -> torch.Tensor:
        """What the trainer feeds the model."""
        return self.video


class SharedMemoryError(RuntimeError):
    """The data loaders' batches in flight would not fit the node's shared memory."""


class FrameBatch(NamedTuple):
    """A batch as a DataLoader worker hands it over: the clips' frames as stored (uint8)."""

    keys: list[str]
    frames: torch.Tensor  # B T 3 h w uint8, h = w = the clips' own size
    lane_state: tuple[int, dict] | None = None  # as in Batch

    def to_batch(self, resolution: int, device: torch.device | None = None) -> Batch:
        """The ``Batch`` of these frames: floats in [-1, 1] at ``resolution``, on ``device``."""
        frames = self.frames if device is None else self.frames.to(device)
        return Batch(self.keys, frames_to_video(frames, resolution), self.lane_state)


class LatentBatch(NamedTuple):
    """A batch of cached latents (``mardini/data/latents.py``) and their shard keys."""

    keys: list[str]
    latents: tuple[torch.Tensor, torch.Tensor]  # (hi B T C h w, lo B T C h' w')
    lane_state: tuple[int, dict] | None = None  # as in Batch

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the trainer feeds the model."""
        return self.latents


def make_batch(
    samples: list[RawSample], spec: ClipSpec, starts: list[int]
) -> FrameBatch | LatentBatch:
    """Decode samples (mp4 or cached latents, not mixed) at the given window starts."""
    keys = [s["__key__"] for s in samples]
    kinds = {is_latent_sample(s) for s in samples}
    if len(kinds) > 1:
        raise ValueError(f"batch {keys} mixes mp4 and latent samples; keep them in separate roots")
    pairs = list(zip(samples, starts, strict=True))
    if kinds == {True}:
        his, los = zip(*(decode_latents(s, spec, i) for s, i in pairs), strict=True)
        return LatentBatch(keys, (torch.stack(his), torch.stack(los)))
    return FrameBatch(keys, torch.stack([decode_frames(s, spec, i) for s, i in pairs]))


def _worker() -> tuple[int, int]:
    """``(worker id, worker count)`` inside a DataLoader worker, ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _deal(items: list[str], index: int, count: int) -> list[str]:
    """Every ``count``-th item from ``index``, or all items when there are fewer than ``count``."""
    return items[index::count] if len(items) >= count else items


class _Lane:
    """One endless, seeded stream of raw samples that can be saved and restored in O(1).

    Its shards pass in a fresh seeded order every epoch through a shuffle buffer: webdataset's
    algorithm (``wds.shuffle(n, n)``: add one or two samples, pick one at random), written out
    here so that its state is plain data: the buffered samples as references (epoch, index in
    that epoch's shard order, sample in shard), the RNG state and the read cursor. A lane made
    from ``state()`` continues the stream exactly, after reading only the buffered samples
    again (at most ``shuffle_buffer``) and seeking to the cursor: the cost of a resume does not
    grow with the step it resumes at."""

    def __init__(
        self, shards: list[str], shuffle_buffer: int, seed_key: str, state: dict | None = None
    ) -> None:
        self._shards, self._size, self._seed_key = shards, shuffle_buffer, seed_key
        self._rng = random.Random(f"{seed_key}/buf")
        self._buffer: list[tuple[tuple[int, int, int], RawSample]] = []
        self._cursor = (0, 0, 0)  # the next sample to read: epoch, shard in order, sample
        self._reader: Iterator[RawSample] | None = None
        self._orders: dict[int, list[str]] = {}
        self.position = 0  # samples handed out so far
        self.reads = 0  # samples read from shards (the cost of skipping and restoring)
        if state is not None:
            self._restore(state)

    def _order(self, epoch: int) -> list[str]:
        if epoch not in self._orders:
            order = list(self._shards)
            random.Random(f"{self._seed_key}/epoch={epoch}").shuffle(order)
            self._orders = {epoch: order}  # epochs only move forward
        return self._orders[epoch]

    def _read(self) -> tuple[tuple[int, int, int], RawSample]:
        while True:
            epoch, shard, index = self._cursor
            if self._reader is None:
                self._reader = shard_samples(self._order(epoch)[shard], start=index)
            sample = next(self._reader, None)
            if sample is None:  # end of this shard: the next one, or the next epoch
                self._reader = None
                last = shard + 1 == len(self._shards)
                self._cursor = (epoch + 1, 0, 0) if last else (epoch, shard + 1, 0)
                continue
            self._cursor = (epoch, shard, index + 1)
            self.reads += 1
            return (epoch, shard, index), sample

    def _next(self) -> RawSample:
        # webdataset.filters._shuffle with bufsize = initial = shuffle_buffer on an endless stream
        while True:
            self._buffer.append(self._read())
            if len(self._buffer) < self._size:
                self._buffer.append(self._read())
            if len(self._buffer) >= self._size:
                k = self._rng.randint(0, len(self._buffer) - 1)
                picked = self._buffer[k]
                self._buffer[k] = self._buffer[-1]
                self._buffer.pop()
                return picked[1]

    def take(self, position: int, count: int) -> list[RawSample]:
        """Samples ``position .. position + count - 1`` of the lane (forward only)."""
        if position < self.position:
            raise RuntimeError(f"lane {self._seed_key} cannot go back to {position}")
        for _ in range(position - self.position):
            self._next()  # skipped: read from the shard, never decoded
        out = [self._next() for _ in range(count)]
        self.position = position + count
        return out

    def state(self) -> dict:
        """Plain data (JSON-able) from which ``_Lane(..., state=...)`` continues the stream."""
        version, internal, gauss = self._rng.getstate()
        return {
            "position": self.position,
            "cursor": list(self._cursor),
            "buffer": [list(ref) for ref, _ in self._buffer],
            "rng": [version, list(internal), gauss],
        }

    def _restore(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.position = int(state["position"])
        self._cursor = tuple(state["cursor"])  # type: ignore[assignment]
        for epoch, shard, index in state["buffer"]:
            url = self._order(epoch)[shard]
            sample = next(shard_samples(url, start=index), None)
            if sample is None:
                raise RuntimeError(
                    f"lane {self._seed_key}: {url} has no sample {index} any more; the shards "
                    "changed since the checkpoint was written"
                )
            self.reads += 1
            self._buffer.append(((epoch, shard, index), sample))


class TrainClips(IterableDataset):
    """Endless training batches from step ``start_step`` on; see the module docstring."""

    def __init__(
        self,
        shards: list[str],
        spec: ClipSpec,
        *,
        micro_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        start_step: int = 0,
        shuffle_buffer: int = 64,
        lanes: int = DEFAULT_LANES,
        lane_states: dict[int, dict] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("TrainClips needs at least one shard URL")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch < 1 or shuffle_buffer < 1 or lanes < 1 or start_step < 0:
            raise ValueError(
                f"need micro_batch, shuffle_buffer, lanes >= 1 and start_step >= 0, got "
                f"{micro_batch}, {shuffle_buffer}, {lanes}, {start_step}"
            )
        if len(shards) < world_size:
            log.warning(
                "%d shards for %d ranks: ranks share shards (their streams still differ by "
                "seed); write at least one shard per rank for disjoint data",
                len(shards),
                world_size,
            )
        self.rank_shards = _deal(shards, rank, world_size)
        self.spec, self.micro_batch, self.lanes = spec, micro_batch, lanes
        self.start_step, self.shuffle_buffer = start_step, shuffle_buffer
        self.lane_states = {int(k): v for k, v in (lane_states or {}).items()}
        self._seed_key = f"mardini-train/seed={seed}/rank={rank}/world={world_size}"
        self.open_lanes: dict[int, _Lane] = {}  # of the last iterator in this process

    def _lane(self, lane: int, position: int) -> _Lane:
        """Lane ``lane``, restored from its saved state when that state is not past
        ``position`` (the first sample this iterator needs from it), else from its start."""
        shards = _deal(self.rank_shards, lane, self.lanes)
        key = f"{self._seed_key}/lane={lane}"
        state = self.lane_states.get(lane)
        if state is not None and int(state["position"]) > position:
            log.warning("lane %d: saved at sample %s, past %d; replaying it", lane, state["position"], position)  # fmt: skip
            state = None
        return _Lane(shards, self.shuffle_buffer, key, state)

    @property
    def samples_read(self) -> int:
        """Samples the lanes of the last iterator (in this process) read from shards."""
        return sum(lane.reads for lane in self.open_lanes.values())

    def batch(self, step: int, samples: list[RawSample]) -> FrameBatch | LatentBatch:
        """Decode one step's raw samples, each at a window seeded by (seed, rank, step, item)."""
        starts = [
            random.Random(f"{self._seed_key}/step={step}/item={item}").randrange(
                window_starts(clip_info(sample), self.spec)
            )
            for item, sample in enumerate(samples)
        ]
        return make_batch(samples, self.spec, starts)

    def __iter__(self) -> Iterator[FrameBatch | LatentBatch]:
        worker, workers = _worker()
        lanes = self.open_lanes = {}
        for step in itertools.count(self.start_step + worker, workers):
            lane, index = step % self.lanes, step // self.lanes
            if lane not in lanes:
                lanes[lane] = self._lane(lane, index * self.micro_batch)
            samples = lanes[lane].take(index * self.micro_batch, self.micro_batch)
            yield self.batch(step, samples)._replace(lane_state=(lane, lanes[lane].state()))


class ValClips(IterableDataset):
    """One ordered pass over a split, dealt disjointly to ranks and workers; see the module doc."""

    def __init__(
        self, shards: list[str], spec: ClipSpec, *, batch: int, rank: int, world_size: int
    ) -> None:
        if not shards:
            raise ValueError("ValClips needs at least one shard URL")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.shards, self.spec, self.batch = shards, spec, batch
        self.rank, self.world_size = rank, world_size

    def _samples(self) -> Iterator[RawSample]:
        worker, workers = _worker()
        readers, reader = self.world_size * workers, self.rank * workers + worker
        if len(self.shards) >= readers:
            for url in self.shards[reader::readers]:
                yield from shard_samples(url)
            return
        # Fewer shards than readers: every reader streams the split, decodes only its samples.
        samples = itertools.chain.from_iterable(shard_samples(url) for url in self.shards)
        yield from itertools.islice(samples, reader, None, readers)

    def __iter__(self) -> Iterator[FrameBatch | LatentBatch]:
        samples = self._samples()
        while chunk := list(itertools.islice(samples, self.batch)):
            yield make_batch(chunk, self.spec, [0] * len(chunk))


def _check_clips(url: str, spec: ClipSpec) -> None:
    """Fail early, in the calling process, if the first clip cannot serve this stage."""
    with contextlib.closing(shard_samples(url)) as samples:
        first = next(samples)
        window_starts(clip_info(first), spec)
        if is_latent_sample(first):
            decode_latents(first, spec)  # the cache's resolution is the stage's


def sample_bytes(shards: str, split: str, *, frames: int, resolution: int, fps: float) -> int:
    """Bytes one sample of ``{shards}/{split}`` takes as a worker hands it over (uint8 frames
    at the clips' own size, or cached latents), measured on the split's first sample."""
    spec = ClipSpec(frames=frames, resolution=resolution, fps=fps)
    with contextlib.closing(shard_samples(list_shards(shards, split)[0])) as samples:
        batch = make_batch([next(samples)], spec, [0])
    tensors = batch.latents if isinstance(batch, LatentBatch) else (batch.frames,)
    return sum(t.nbytes for t in tensors)


def shm_bytes(*, ranks: int, workers: int, prefetch: int, batch: int, sample_bytes: int) -> int:
    """The most shared memory the loaders of ``ranks`` processes on one node hold: each
    worker keeps up to ``prefetch`` batches waiting, and the trainer holds the one it took."""
    if workers == 0:
        return 0  # the main process decodes: nothing crosses a process boundary
    return ranks * (workers * prefetch + 1) * batch * sample_bytes


def check_shm(
    *,
    ranks: int,
    workers: int,
    prefetch: int,
    batch: int,
    sample_bytes: int,
    path: str = SHM_PATH,
    free: int | None = None,
) -> int:
    """Refuse loaders whose ``shm_bytes`` exceed the free space of ``path`` (``free``, when
    given, stands for the measurement); returns the budget."""
    needed = shm_bytes(
        ranks=ranks, workers=workers, prefetch=prefetch, batch=batch, sample_bytes=sample_bytes
    )
    if needed == 0:
        return 0
    if free is None:
        if not os.path.isdir(path):
            log.warning("no %s here: the loaders' %.2f GiB of shared memory are not checked", path, needed / 2**30)  # fmt: skip
            return needed
        stat = os.statvfs(path)
        free = stat.f_bavail * stat.f_frsize
    budget = (
        f"{ranks} rank(s) x ({workers} workers x prefetch {prefetch} + 1) x micro_batch {batch} "
        f"x {sample_bytes / 2**20:.3g} MiB a sample = {needed / 2**30:.3g} GiB"
    )
    if needed > free:
        raise SharedMemoryError(
            f"the data loaders need {budget} of shared memory, {path} has {free / 2**30:.2f} GiB "
            "free: lower data.workers or data.prefetch (or the stage's micro_batch), or give "
            f"the job a larger {path}"
        )
    log.info("data loaders: %s of shared memory, %s has %.2f GiB free", budget, path, free / 2**30)
    return needed


def _stream(
    dataset: IterableDataset,
    workers: int,
    resolution: int,
    prefetch: int = 2,
    device: torch.device | None = None,
) -> Iterator[Batch | LatentBatch]:
    """The dataset's batches, read by ``workers`` processes; frames become clips here."""
    if workers == 0:
        batches = iter(dataset)
    else:
        # batch_size=None: each worker already yields whole batches; in-order round-robin
        # keeps the step order deterministic.
        # spawn, not fork: a forked worker inherits the parent's threads and handlers
        # (Prefect, MLflow, logging) and was seen to exit with code 1 at shutdown in the full
        # test suite here, while passing alone. Workers only need the dataset's plain
        # attributes, which pickle.
        batches = iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                prefetch_factor=prefetch,
                in_order=True,
                multiprocessing_context="spawn",
            )
        )
    return (b.to_batch(resolution, device) if isinstance(b, FrameBatch) else b for b in batches)


def train_batches(
    shards: str,
    *,
    frames: int,
    resolution: int,
    fps: float,
    micro_batch: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    workers: int = 0,
    shuffle_buffer: int = 64,
    lanes: int = DEFAULT_LANES,
    split: str = "train",
    lane_states: dict[int, dict] | None = None,
    prefetch: int = 2,
    device: torch.device | None = None,
) -> Iterator[Batch | LatentBatch]:
    """Endless ``Batch(keys, video_BTCHW)`` (``LatentBatch`` from a latent cache) of
    ``{shards}/{split}``, from step ``start_step``; ``lane_states`` (the ``lane_state`` of the
    last batch before ``start_step`` of each lane, as a checkpoint keeps them) make the resume
    seek instead of reading through every sample before it. Workers hand over uint8 frames
    (``prefetch`` batches each at most); clips are made from them here, on ``device``."""
    urls = list_shards(shards, split)
    spec = ClipSpec(frames=frames, resolution=resolution, fps=fps)
    _check_clips(urls[0], spec)
    dataset = TrainClips(
        urls,
        spec,
        micro_batch=micro_batch,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        shuffle_buffer=shuffle_buffer,
        lanes=lanes,
        lane_states=lane_states,
    )
    return _stream(dataset, workers, resolution, prefetch, device)


def train_loader(
    shards: str,
    *,
    frames: int,
    resolution: int,
    fps: float,
    micro_batch: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    workers: int = 0,
    shuffle_buffer: int = 64,
    lanes: int = DEFAULT_LANES,
    split: str = "train",
    lane_states: dict[int, dict] | None = None,
    prefetch: int = 2,
    device: torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """Endless ``B T 3 H W`` training batches in [-1, 1] (``(hi, lo)`` latents from a latent
    cache), resumable at ``start_step``. ``lane_states`` restores the lanes (see
    ``train_batches``) and is kept up to date: after each batch handed out it holds every
    lane's state, what a checkpoint saves."""
    batches = train_batches(
        shards,
        frames=frames,
        resolution=resolution,
        fps=fps,
        micro_batch=micro_batch,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        workers=workers,
        shuffle_buffer=shuffle_buffer,
        lanes=lanes,
        split=split,
        lane_states=lane_states,  # TrainClips keeps its own copy: updates below do not reach it
        prefetch=prefetch,
        device=device,
    )
    return _tracked(batches, lane_states)


def _tracked(
    batches: Iterator[Batch | LatentBatch], lane_states: dict[int, dict] | None
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        if lane_states is not None and batch.lane_state is not None:
            lane, state = batch.lane_state
            lane_states[lane] = state
        yield batch.inputs


def val_batches(
    shards: str,
    *,
    frames: int,
    resolution: int,
    fps: float,
    batch: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    split: str = "val",
) -> Iterator[Batch | LatentBatch]:
    """One ordered pass of ``Batch(keys, video_BTCHW)`` (``LatentBatch`` from a latent cache)
    over this rank's share of the split."""
    urls = list_shards(shards, split)
    spec = ClipSpec(frames=frames, resolution=resolution, fps=fps)
    _check_clips(urls[0], spec)
    dataset = ValClips(urls, spec, batch=batch, rank=rank, world_size=world_size)
    return _stream(dataset, workers, resolution)


def val_loader(
    shards: str,
    *,
    frames: int,
    resolution: int,
    fps: float,
    batch: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    split: str = "val",
) -> Iterator[torch.Tensor]:
    """``B T 3 H W`` batches (``(hi, lo)`` from a latent cache) covering this rank's share of
    the split once (the last may be short)."""
    batches = val_batches(
        shards,
        frames=frames,
        resolution=resolution,
        fps=fps,
        batch=batch,
        rank=rank,
        world_size=world_size,
        workers=workers,
        split=split,
    )
    return (b.inputs for b in batches)
