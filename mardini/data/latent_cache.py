"""Precompute autoencoder latents of every sharded clip, beside the mp4 shards.

For each mp4 shard ``{shards}/{split}/shard-X.tar`` one latent shard
``{cache}/{split}/shard-X.tar`` (layout and sample format: ``mardini/data/latents.py``).
Every frame of a clip is decoded at the cache resolution and encoded at both resolutions with
``mardini.autoencoder.encode_pair``, the function the model itself calls, so training from the
cache sees the latents it would have computed.

Resumable and idempotent: a latent shard is staged locally and published in one step, and an
existing one is skipped (mp4 shard names are content keys, so a name means one content).
``latents.json`` is written last; latent shards whose mp4 shard is gone are then deleted.
A cache of another dtype at the same place is refused unless ``overwrite``.

In parts (``part=(i, n)``, the pods of an Indexed Job): part ``i`` encodes the shards at
positions ``i, i + n, ...`` of the sorted list and records them in ``parts/{i}-of-{n}.json``
(after publishing them). Every part then checks whether every shard is recorded; the one that
finds them all writes ``latents.json``. Each part writes before it checks, so the last part to
check sees every record: some part always finishes the cache, and two that both do write the
same record.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import tarfile
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import torch

from mardini.autoencoder import Autoencoder, encode_pair, fingerprint
from mardini.data.clips import ClipSpec, clip_info, decode_clip
from mardini.data.latents import CACHE_RECORD, DTYPES, HI, LO, cache_url, to_npy
from mardini.data.shards import (
    SHARD_PATTERN,
    STAGING_PREFIX,
    list_shards,
    shard_samples,
    tar_add,
)
from mardini.storage import filesystem, is_local, join, publish, read_json, write_json

log = logging.getLogger(__name__)


class LatentCacheError(ValueError):
    """A cache that cannot be written as asked (another dtype there, no shards, a bad part)."""


ShardCallback = Callable[[str, int, bool], None]  # (shard URL, clips, skipped)

# Under a cache: one record per part of an Indexed Job (``{index}-of-{parts}.json``).
PARTS_DIR = "parts"


def _split_shards(shards: str, split: str) -> list[str]:
    """Sorted mp4 shard URLs of one split (empty when the split has none)."""
    try:
        return list_shards(shards, split)
    except FileNotFoundError:
        return []


def encode_shard(
    src: str,
    dst: str,
    autoencoder: Autoencoder,
    planner_downscale: int,
    resolution: int,
    dtype: str,
    device: torch.device,
) -> int:
    """Write the latent shard of one mp4 shard; returns its clip count."""
    count = 0
    fs, path = filesystem(dst)
    # Staged beside the target on a local disk (a rename publishes it), else in a temp dir.
    staging = os.path.dirname(path) if is_local(fs) else tempfile.gettempdir()
    os.makedirs(staging, exist_ok=True)
    staged = os.path.join(staging, f"{STAGING_PREFIX}{posixpath.basename(path)}.{uuid.uuid4().hex}")
    try:
        with tarfile.open(staged, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in shard_samples(src):
                info = clip_info(sample)
                spec = ClipSpec(frames=info.frames, resolution=resolution, fps=info.fps)
                video = decode_clip(sample, spec)[None].to(device)  # 1 T 3 H W
                hi, lo = encode_pair(autoencoder, video, planner_downscale)
                meta = json.loads(sample["json"])
                meta["latents"] = {
                    "resolution": resolution,
                    "planner_downscale": planner_downscale,
                    "dtype": dtype,
                    "hi_shape": list(hi.shape[1:]),
                    "lo_shape": list(lo.shape[1:]),
                }
                key = sample["__key__"]
                tar_add(tar, f"{key}.{HI}", to_npy(hi[0], dtype))
                tar_add(tar, f"{key}.{LO}", to_npy(lo[0], dtype))
                tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                count += 1
        publish(staged, dst)
    finally:
        if os.path.exists(staged):  # failed before publishing
            os.remove(staged)
    return count


def cache_latents(
    shards: str,
    autoencoder: Autoencoder,
    *,
    planner_downscale: int,
    resolution: int,
    splits: tuple[str, ...] = ("train", "val"),
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    on_plan: Callable[[int], None] | None = None,
    on_shard: ShardCallback | None = None,
    part: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Cache the latents of every clip of ``{shards}/{split}`` (of this ``part``'s share of the
    shards); returns the ``latents.json`` record, with ``complete`` false when other parts are
    still missing."""
    if dtype not in DTYPES:
        raise LatentCacheError(f"latent dtype {dtype!r}: use one of {DTYPES}")
    index, parts = part
    if not 0 <= index < parts:
        raise LatentCacheError(
            f"latent cache part {index} of {parts}: the index must be in [0, {parts})"
        )
    device = torch.device(device)
    autoencoder = autoencoder.to(device).eval()
    key = fingerprint(autoencoder, planner_downscale)
    url = cache_url(shards, resolution, key)
    record_url = join(url, CACHE_RECORD)
    old = read_json(record_url)
    fs, root = filesystem(url)
    if old is not None and old.get("dtype") != dtype:
        if not overwrite or parts > 1:  # parts must not delete each other's work
            raise LatentCacheError(
                f"{url} holds {old.get('dtype')} latents, asked for {dtype}: pass the same dtype, "
                "or --overwrite to delete that cache first"
            )
        fs.rm(root, recursive=True)

    plan = {split: _split_shards(shards, split) for split in splits}
    if not any(plan.values()):
        raise LatentCacheError(
            f"no mp4 shards under {shards}/{{{','.join(splits)}}}: run `mardini prep shard` first"
        )
    mine = {
        src
        for position, src in enumerate(sorted(src for v in plan.values() for src in v))
        if position % parts == index
    }
    if on_plan is not None:
        on_plan(len(mine))
    record: dict[str, Any] = {
        "source": shards,
        "url": url,
        "fingerprint": key,
        "autoencoder": type(autoencoder).__name__,
        "planner_downscale": planner_downscale,
        "resolution": resolution,
        "dtype": dtype,
        "splits": {},
    }
    counted = _counts(url, old)
    written: dict[str, list[dict[str, Any]]] = {}
    for split, sources in plan.items():
        done = counted.get(split, {})
        for src in sources:
            if src not in mine:
                continue
            name = posixpath.basename(src)
            dst = join(url, split, name)
            skipped = fs.exists(filesystem(dst)[1])
            if skipped:
                clips = done[name] if name in done else _count(dst)
            else:
                clips = encode_shard(
                    src, dst, autoencoder, planner_downscale, resolution, dtype, device
                )
            written.setdefault(split, []).append({"name": name, "clips": clips})
            if on_shard is not None:
                on_shard(src, clips, skipped)
    if parts > 1:
        # Shaped as latents.json's splits, so _counts reads both alike.
        own = {split: {"shards": entries} for split, entries in written.items()}
        write_json(join(url, PARTS_DIR, f"{index}-of-{parts}.json"), {"splits": own})
        counted = _counts(url, old)
    for split, entries in written.items():
        counted.setdefault(split, {}).update({e["name"]: e["clips"] for e in entries})
    missing = [
        src
        for split, sources in plan.items()
        for src in sources
        if posixpath.basename(src) not in counted.get(split, {})
    ]
    if missing:  # other parts' shards: the last part to finish writes the record
        log.info("latent cache part %d of %d done; %d shards left to other parts",
                 index, parts, len(missing))  # fmt: skip
        return {**record, "complete": False}
    for split, sources in plan.items():
        entries = [
            {"name": posixpath.basename(s), "clips": counted[split][posixpath.basename(s)]}
            for s in sources
        ]
        record["splits"][split] = {
            "shards": entries,
            "clips": sum(e["clips"] for e in entries),
        }
        _remove_stale(url, split, {e["name"] for e in entries})
    record["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_json(record_url, record)
    return {**record, "complete": True}


def _counts(url: str, old: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    """Clip counts per split and shard name that the cache records: ``latents.json`` (an earlier
    run) and the part records (this run's Job), which only ever list published shards."""
    counted: dict[str, dict[str, int]] = {}
    records = [old or {}]
    fs, path = filesystem(join(url, PARTS_DIR))
    fs.invalidate_cache(path)  # other processes (the Job's other pods) write here
    blobs = fs.cat(fs.glob(join(path, "*.json")), on_error="omit") if fs.exists(path) else {}
    records += [json.loads(blob) for blob in blobs.values()]
    for rec in records:
        for split, info in (rec.get("splits") or {}).items():
            counted.setdefault(split, {}).update({s["name"]: s["clips"] for s in info["shards"]})
    return counted


def _count(url: str) -> int:
    return sum(1 for _ in shard_samples(url))


def _remove_stale(url: str, split: str, keep: set[str]) -> None:
    """Delete latent shards of mp4 shards that no longer exist (the dataset was re-cut), and
    staging files a killed run left on a local disk."""
    fs, path = filesystem(join(url, split))
    for found in fs.glob(join(path, SHARD_PATTERN)) + fs.glob(join(path, STAGING_PREFIX + "*")):
        if posixpath.basename(found) not in keep:
            log.info("removing stale latent shard %s", found)
            fs.rm(found)
