"""Streaming train and validation loaders over WebDataset shards (local or ``s3://``).

Shapes: B batch, T frames, C = 3 channels, H = W = the stage resolution; values in [-1, 1].

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
out round-robin from worker 0. Resuming reads (never decodes) the skipped samples of a lane;
decoding, the expensive part, starts at step ``k``. Workers are cheapest when they divide
``lanes`` (then no two workers read the same lane).

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
import random
from collections.abc import Iterator
from typing import NamedTuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mardini.data.clips import ClipSpec, RawSample, clip_info, decode_clip, window_starts
from mardini.data.latents import decode_latents, is_latent_sample
from mardini.data.shards import list_shards, shard_samples

log = logging.getLogger(__name__)

DEFAULT_LANES = 8


class Batch(NamedTuple):
    """A batch of clips from mp4 shards and the shard keys they came from."""

    keys: list[str]
    video: torch.Tensor  # B T 3 H W in [-1, 1]

    @property
    def inputs(self) -> torch.Tensor:
        """What the trainer feeds the model."""
        return self.video


class LatentBatch(NamedTuple):
    """A batch of cached latents (``mardini/data/latents.py``) and their shard keys."""

    keys: list[str]
    latents: tuple[torch.Tensor, torch.Tensor]  # (hi B T C h w, lo B T C h' w')

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the trainer feeds the model."""
        return self.latents


def make_batch(samples: list[RawSample], spec: ClipSpec, starts: list[int]) -> Batch | LatentBatch:
    """Decode samples (mp4 or cached latents, not mixed) at the given window starts."""
    keys = [s["__key__"] for s in samples]
    kinds = {is_latent_sample(s) for s in samples}
    if len(kinds) > 1:
        raise ValueError(f"batch {keys} mixes mp4 and latent samples; keep them in separate roots")
    pairs = list(zip(samples, starts, strict=True))
    if kinds == {True}:
        his, los = zip(*(decode_latents(s, spec, i) for s, i in pairs), strict=True)
        return LatentBatch(keys, (torch.stack(his), torch.stack(los)))
    return Batch(keys, torch.stack([decode_clip(s, spec, i) for s, i in pairs]))


def _worker() -> tuple[int, int]:
    """``(worker id, worker count)`` inside a DataLoader worker, ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _deal(items: list[str], index: int, count: int) -> list[str]:
    """Every ``count``-th item from ``index``, or all items when there are fewer than ``count``."""
    return items[index::count] if len(items) >= count else items


class _Lane:
    """One endless, seeded stream of raw samples that can skip forward without decoding."""

    def __init__(self, shards: list[str], shuffle_buffer: int, seed_key: str) -> None:
        self._seed_key = seed_key
        shuffle = wds.shuffle(shuffle_buffer, shuffle_buffer, rng=random.Random(f"{seed_key}/buf"))
        self._samples: Iterator[RawSample] = shuffle(self._epochs(shards))
        self.position = 0  # samples consumed so far

    def _epochs(self, shards: list[str]) -> Iterator[RawSample]:
        for epoch in itertools.count():
            order = list(shards)
            random.Random(f"{self._seed_key}/epoch={epoch}").shuffle(order)
            for url in order:
                yield from shard_samples(url)

    def take(self, position: int, count: int) -> list[RawSample]:
        """Samples ``position .. position + count - 1`` of the lane (forward only)."""
        if position < self.position:
            raise RuntimeError(f"lane {self._seed_key} cannot go back to {position}")
        for _ in range(position - self.position):
            next(self._samples)  # skipped: read from the shard, never decoded
        out = [next(self._samples) for _ in range(count)]
        self.position = position + count
        return out


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
        self._seed_key = f"mardini-train/seed={seed}/rank={rank}/world={world_size}"

    def _lane(self, lane: int) -> _Lane:
        shards = _deal(self.rank_shards, lane, self.lanes)
        return _Lane(shards, self.shuffle_buffer, f"{self._seed_key}/lane={lane}")

    def batch(self, step: int, samples: list[RawSample]) -> Batch | LatentBatch:
        """Decode one step's raw samples, each at a window seeded by (seed, rank, step, item)."""
        starts = [
            random.Random(f"{self._seed_key}/step={step}/item={item}").randrange(
                window_starts(clip_info(sample), self.spec)
            )
            for item, sample in enumerate(samples)
        ]
        return make_batch(samples, self.spec, starts)

    def __iter__(self) -> Iterator[Batch | LatentBatch]:
        worker, workers = _worker()
        lanes: dict[int, _Lane] = {}
        for step in itertools.count(self.start_step + worker, workers):
            lane, index = step % self.lanes, step // self.lanes
            if lane not in lanes:
                lanes[lane] = self._lane(lane)
            samples = lanes[lane].take(index * self.micro_batch, self.micro_batch)
            yield self.batch(step, samples)


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

    def __iter__(self) -> Iterator[Batch | LatentBatch]:
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


def _stream(dataset: IterableDataset, workers: int) -> Iterator[Batch | LatentBatch]:
    if workers == 0:
        return iter(dataset)
    # batch_size=None: each worker already yields whole batches; in-order round-robin keeps
    # the step order deterministic.
    # spawn, not fork: a forked worker inherits the parent's threads and handlers (Prefect,
    # MLflow, logging) and was seen to exit with code 1 at shutdown in the full test suite here,
    # while passing alone. Workers only need the dataset's plain attributes, which pickle.
    return iter(
        DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            in_order=True,
            multiprocessing_context="spawn",
        )
    )


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
) -> Iterator[Batch | LatentBatch]:
    """Endless ``Batch(keys, video_BTCHW)`` (``LatentBatch`` from a latent cache) of
    ``{shards}/{split}``, from step ``start_step``."""
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
    )
    return _stream(dataset, workers)


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
) -> Iterator[torch.Tensor]:
    """Endless ``B T 3 H W`` training batches in [-1, 1] (``(hi, lo)`` latents from a latent
    cache), resumable at ``start_step``."""
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
    )
    return (b.inputs for b in batches)


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
    return _stream(dataset, workers)


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
