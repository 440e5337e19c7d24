"""Inputs -> chunks -> shards -> manifest: the one implementation the CLI and the flow share.

Layout under the dataset URL (``{out}/{dataset}``)::

    prep_config.json              the config fingerprint every shard here was cut with
    chunks/{chunk}.json           completion marker of one chunk: its inputs and its shards
    train/shard-{chunk}-000.tar   WebDataset shards (val/ alike)
    manifest.json                 every input with its status, all shards, counts; written last

Idempotence and resumption: inputs are sorted and cut into chunks at content-defined
boundaries (a boundary follows an input whose name hash is 0 modulo ``chunk_inputs``), so adding
or removing a video changes one chunk, not every chunk after it. Order and boundaries follow the
inputs' relative names, not their absolute URLs, so the same videos make the same shards (and the
same training order) wherever the folder lies. A chunk's key hashes the config fingerprint with
its inputs' names and sizes, and names its shards (whose sorted names are the loader's order), so
a rerun computes the same shard names, in any folder. A chunk is done when its marker exists; the marker is written only after all its
shards are published, and shards are published whole (see ``shards.py``). A killed run thus
leaves complete shards and markers only; the rerun skips marked chunks and redoes the others,
overwriting any shard of an unmarked chunk with identical bytes. The manifest is written last;
then shards, markers and staging files it does not list (an earlier input set, a killed run)
are deleted, so listing ``{split}/shard-*.tar`` (what the loader does) agrees with it.
A different config (another fingerprint in ``prep_config.json``) is refused, never mixed in.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from data_prep.clips import VideoResult, process_video, rejected_result
from data_prep.config import PrepConfig, PrepError
from data_prep.inputs import InputFile, list_inputs
from data_prep.shards import SplitWriter, StagedShard
from mardini.data.shards import MANIFEST, SHARD_PATTERN, STAGING_PREFIX
from mardini.storage import (
    STAGED_JSON,
    filesystem,
    is_local,
    join,
    publish,
    read_json,
    store_root,
    write_json,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
CONFIG_FILE = "prep_config.json"
CHUNKS_DIR = "chunks"
_PR_SET_PDEATHSIG = 1  # prctl(2) option, Linux
# A chunk closes after this many times chunk_inputs even without a content boundary.
_MAX_CHUNK_FACTOR = 3

InputCallback = Callable[[dict[str, Any], bool], None]  # (manifest entry, resumed)
VideoFn = Callable[[InputFile, PrepConfig, str, int], VideoResult]  # process_video's shape


@dataclass(frozen=True)
class Chunk:
    """A group of inputs processed, retried and committed together; ``key`` names its shards."""

    key: str
    inputs: tuple[InputFile, ...]


def default_out() -> str:
    """Where shards go when ``--out`` is not given: ``{MARDINI_STORE}/shards``."""
    return join(store_root(), "shards")


def dataset_url(out: str, dataset: str) -> str:
    """``{out}/{dataset}``, checking the dataset name is one path component."""
    if not dataset or "/" in dataset or dataset.startswith("."):
        raise PrepError(f"dataset name {dataset!r} must be a plain name (no '/', not hidden)")
    return join(out, dataset)


def _hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


def plan_chunks(inputs: Sequence[InputFile], cfg: PrepConfig) -> list[Chunk]:
    """Cut inputs, sorted by name, into chunks at content-defined boundaries; keys are content
    hashes. Only the inputs' names (relative to where they were found) decide the order and the
    boundaries: the absolute path of a clone or a mount point must not change the data."""
    fingerprint = cfg.fingerprint()
    limit = _MAX_CHUNK_FACTOR * cfg.chunk_inputs
    groups: list[list[InputFile]] = [[]]
    for inp in sorted(inputs, key=lambda i: (i.name, i.url)):
        groups[-1].append(inp)
        if _hash_int(inp.name) % cfg.chunk_inputs == 0 or len(groups[-1]) >= limit:
            groups.append([])
    chunks = []
    for group in groups:
        if group:
            text = "\n".join([fingerprint, *(f"{i.name}\t{i.size}" for i in group)])
            key = hashlib.sha256(text.encode()).hexdigest()[:12]
            chunks.append(Chunk(key=key, inputs=tuple(group)))
    return chunks


def claim_dataset(url: str, cfg: PrepConfig, overwrite: bool = False) -> None:
    """Record the config fingerprint at ``url``, refusing to mix with shards cut differently."""
    fs, path = filesystem(url)
    if overwrite and fs.exists(path):
        log.warning("%s: --overwrite: deleting the existing dataset", url)
        fs.rm(path, recursive=True)
    record = read_json(join(url, CONFIG_FILE)) or read_json(join(url, MANIFEST))
    if record is not None and record.get("fingerprint") != cfg.fingerprint():
        old = record.get("config") or {}
        new = cfg.output_fields()
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        raise PrepError(
            f"{url} holds shards cut with a different prep config "
            f"({', '.join(changed) or 'fingerprint ' + str(record.get('fingerprint'))}). "
            "Mixing them would corrupt the dataset: shard to a new --dataset name, or pass "
            "--overwrite to delete the old shards and start over."
        )
    if record is None:
        write_json(
            join(url, CONFIG_FILE),
            {"fingerprint": cfg.fingerprint(), "config": cfg.output_fields()},
        )


def marker_url(url: str, chunk: Chunk) -> str:
    """Where the completion marker of ``chunk`` lives."""
    return join(url, CHUNKS_DIR, f"{chunk.key}.json")


class _ChunkWriter:
    """Collects one chunk's results in input order into split writers; commits them at the end."""

    def __init__(self, chunk: Chunk, cfg: PrepConfig, url: str, temp_dir: str) -> None:
        self.chunk, self.cfg, self.url = chunk, cfg, url
        self.entries: list[dict[str, Any]] = []
        fs, path = filesystem(url)
        max_bytes = int(cfg.shard_max_mb * 2**20)
        self.writers = {
            # Local outputs stage beside the final file (rename is atomic); remote ones locally.
            split: SplitWriter(
                split,
                chunk.key,
                os.path.join(path, split) if is_local(fs) else os.path.join(temp_dir, split),
                max_bytes,
                cfg.shard_max_samples,
            )
            for split in SPLITS
        }

    def add(self, result: VideoResult) -> None:
        """Move one input's spooled clips into the shards of its split."""
        writer = self.writers[result.entry["split"]]
        for clip in result.clips:
            with open(clip.path, "rb") as handle:
                writer.add(clip.key, handle.read(), clip.meta)
            os.remove(clip.path)
        self.entries.append(result.entry)

    def commit(self) -> dict[str, Any]:
        """Publish every shard, then the marker (the commit point); returns the marker."""
        staged: list[StagedShard] = []
        for split in SPLITS:
            staged.extend(self.writers[split].close())
        for shard in staged:
            publish(shard.staged, join(self.url, shard.name))
        marker = {
            "chunk": self.chunk.key,
            "fingerprint": self.cfg.fingerprint(),
            "inputs": self.entries,
            "shards": [
                {
                    "path": s.name,
                    "split": s.split,
                    "clips": s.clips,
                    "bytes": s.bytes,
                    "sha256": s.sha256,
                }
                for s in staged
            ],
        }
        write_json(marker_url(self.url, self.chunk), marker)
        log.info(
            "chunk %s: %d inputs, %d shards committed",
            self.chunk.key,
            len(self.entries),
            len(staged),
        )
        return marker

    def discard(self) -> None:
        """Remove whatever was staged (the chunk will be redone from scratch)."""
        for writer in self.writers.values():
            writer.discard()


def _init_worker(parent: int) -> None:
    """Set up a pool process: die with the parent, leave Ctrl-C to it, single-threaded OpenCV."""
    # A parent killed with SIGKILL cannot stop its pool, and idle workers would then wait on
    # their task queue forever: on Linux, ask the kernel to kill them along with the parent.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    # Ctrl-C goes to the whole process group: let the parent alone stop the pool cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pool already fills the cores; OpenCV's own thread pool on 64 px frames only added
    # wake-ups (measured: a 2-process pool ran 1.5x slower with it).
    import cv2

    cv2.setNumThreads(1)


def _cores() -> int:
    """CPU cores this process may run on (a container's quota, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    # spawn, not fork: no forked copies of s3fs event loops or Prefect threads in the workers.
    context = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
    )


def _alone(fn: VideoFn, inp: InputFile, cfg: PrepConfig, spool: str, threads: int) -> VideoResult:
    """Run one input in a process of its own; if that process dies, reject the input."""
    with _pool(1) as pool:
        try:
            return pool.submit(fn, inp, cfg, spool, threads).result()
        except BrokenProcessPool:
            log.error("%s: the process reading it died; rejected", inp.url)
            return rejected_result(
                inp,
                cfg,
                "crashed",
                "the process reading this file died (an FFmpeg crash, or killed for using "
                "too much memory); check the file with ffprobe",
            )


def _results(
    jobs: list[tuple[InputFile, str]],
    cfg: PrepConfig,
    workers: int,
    fn: VideoFn = process_video,
) -> Iterator[VideoResult]:
    """``fn`` over the inputs, results in input order: inline for one worker, else a pool.

    A pool process that dies (a segfault in FFmpeg on a hostile file, the OOM killer) breaks
    the pool and every input in flight with it; those inputs are then rerun one per process,
    so only the one that kills its process is rejected ("crashed") and the run goes on.
    """
    if workers <= 1:
        for inp, spool in jobs:
            yield fn(inp, cfg, spool, 0)
        return
    threads = max(1, _cores() // workers)
    pool = _pool(workers)
    pending: deque[tuple[tuple[InputFile, str], cf.Future[VideoResult]]] = deque()
    submitted = 0
    try:
        while submitted < len(jobs) or pending:
            # A bounded window keeps memory flat and results in input order.
            while submitted < len(jobs) and len(pending) < 2 * workers:
                inp, spool = jobs[submitted]
                pending.append((jobs[submitted], pool.submit(fn, inp, cfg, spool, threads)))
                submitted += 1
            try:
                result = pending[0][1].result()
            except BrokenProcessPool:
                pool.shutdown(wait=True)
                suspects = [job for job, _ in pending]
                pending.clear()
                for inp, spool in suspects:
                    yield _alone(fn, inp, cfg, spool, threads)
                pool = _pool(workers)
                continue
            pending.popleft()
            yield result
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def _read_markers(url: str, chunks: Sequence[Chunk]) -> dict[str, dict[str, Any]]:
    """Existing markers of ``chunks`` by key, fetched in one batch (concurrent on S3)."""
    if not chunks:
        return {}
    fs, _ = filesystem(url)
    paths = {filesystem(marker_url(url, c))[1]: c.key for c in chunks}
    blobs = fs.cat(list(paths), on_error="omit")
    return {paths[path]: json.loads(blob) for path, blob in blobs.items() if path in paths}


def run_chunks(
    chunks: Sequence[Chunk],
    cfg: PrepConfig,
    url: str,
    workers: int | None = None,
    on_input: InputCallback | None = None,
) -> list[dict[str, Any]]:
    """Process every chunk not yet marked done at ``url``; return all chunk markers in order."""
    workers = workers if workers is not None else (cfg.workers or _cores())
    markers: dict[str, dict[str, Any]] = {}
    todo: list[Chunk] = []
    found = _read_markers(url, chunks)
    for chunk in chunks:
        marker = found.get(chunk.key)
        if marker is not None and marker.get("fingerprint") == cfg.fingerprint():
            markers[chunk.key] = marker
            for entry in marker["inputs"]:
                if on_input:
                    on_input(entry, True)
        else:
            todo.append(chunk)
    if markers:
        log.info("%s: %d of %d chunks already done, skipped", url, len(markers), len(chunks))
    if todo:
        temp_root = tempfile.mkdtemp(prefix="data_prep-")
        try:
            jobs: list[tuple[InputFile, str]] = []
            for chunk in todo:
                spool = os.path.join(temp_root, chunk.key, "spool")
                os.makedirs(spool)
                jobs.extend((inp, spool) for inp in chunk.inputs)
            # One input needs no pool (and none of its start-up time).
            results = _results(jobs, cfg, min(workers, len(jobs)))
            for chunk in todo:
                writer = _ChunkWriter(chunk, cfg, url, os.path.join(temp_root, chunk.key))
                try:
                    for _ in chunk.inputs:
                        result = next(results)
                        writer.add(result)
                        if on_input:
                            on_input(result.entry, False)
                    markers[chunk.key] = writer.commit()
                except BaseException:
                    writer.discard()
                    results.close()
                    raise
        finally:
            shutil.rmtree(temp_root, ignore_errors=True)
    return [markers[chunk.key] for chunk in chunks]


def process_chunk(
    chunk: Chunk,
    cfg: PrepConfig,
    url: str,
    workers: int = 1,
    on_input: InputCallback | None = None,
) -> dict[str, Any]:
    """Process (or skip, if already marked) one chunk; return its marker."""
    return run_chunks([chunk], cfg, url, workers=workers, on_input=on_input)[0]


def build_manifest(
    url: str, dataset: str, cfg: PrepConfig, markers: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Merge chunk markers into the dataset manifest and check that every input is counted."""
    entries = sorted((e for m in markers for e in m["inputs"]), key=lambda e: e["url"])
    shards = [{**s, "chunk": m["chunk"]} for m in markers for s in m["shards"]]
    accepted = sum(e["status"] == "accepted" for e in entries)
    rejected = sum(e["status"] == "rejected" for e in entries)
    clips = sum(s["clips"] for s in shards)
    splits = {
        split: {
            "inputs": sum(e["split"] == split and e["status"] == "accepted" for e in entries),
            "clips": sum(s["clips"] for s in shards if s["split"] == split),
            "shards": sum(s["split"] == split for s in shards),
            "bytes": sum(s["bytes"] for s in shards if s["split"] == split),
        }
        for split in SPLITS
    }
    if accepted + rejected != len(entries) or clips != sum(e["clips"] for e in entries):
        raise PrepError(
            f"{url}: manifest does not reconcile ({len(entries)} inputs, {accepted} accepted, "
            f"{rejected} rejected, {clips} clips in shards); delete chunks/ and rerun"
        )
    return {
        "dataset": dataset,
        "url": url,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fingerprint": cfg.fingerprint(),
        "config": cfg.output_fields(),
        "counts": {
            "inputs": len(entries),
            "accepted": accepted,
            "rejected": rejected,
            "clips": clips,
            # Inputs made by data_prep.synthetic (always train; see PrepConfig.synthetic).
            "synthetic": sum(bool(e.get("synthetic")) for e in entries),
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "rejected_by_reason": dict(
                sorted(Counter(e["reason"] for e in entries if e["reason"]).items())
            ),
        },
        "splits": splits,
        "chunks": [
            {
                "chunk": m["chunk"],
                "inputs": len(m["inputs"]),
                "clips": sum(s["clips"] for s in m["shards"]),
            }
            for m in markers
        ],
        "shards": shards,
        "inputs": entries,
    }


def finish_dataset(
    url: str, dataset: str, cfg: PrepConfig, markers: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Write ``manifest.json`` (last), then delete shards and markers it does not list."""
    manifest = build_manifest(url, dataset, cfg, markers)
    write_json(join(url, MANIFEST), manifest)
    _collect_garbage(url, {s["path"] for s in manifest["shards"]}, {m["chunk"] for m in markers})
    log.info(
        "%s: %d inputs (%d accepted, %d rejected), %d clips in %d shards",
        url,
        manifest["counts"]["inputs"],
        manifest["counts"]["accepted"],
        manifest["counts"]["rejected"],
        manifest["counts"]["clips"],
        manifest["counts"]["shards"],
    )
    return manifest


def _collect_garbage(url: str, shards: set[str], chunks: set[str]) -> None:
    """Remove leftovers of earlier input sets and killed runs, so a listing equals the manifest."""
    fs, root = filesystem(url)
    stale: list[str] = []
    for split in SPLITS:
        for pattern in (SHARD_PATTERN, f"{STAGING_PREFIX}*"):
            for path in fs.glob(join(root, split, pattern)):
                if f"{split}/{path.rsplit('/', 1)[-1]}" not in shards:
                    stale.append(path)
    for path in fs.glob(join(root, CHUNKS_DIR, "*.json")):
        if path.rsplit("/", 1)[-1].removesuffix(".json") not in chunks:
            stale.append(path)
    for folder in (root, join(root, CHUNKS_DIR)):
        stale.extend(fs.glob(join(folder, STAGED_JSON)))
    for path in stale:
        fs.rm_file(path)
    if stale:
        log.info("%s: removed %d files no longer in the manifest", url, len(stale))


def shard_videos(
    inputs: Sequence[str],
    out: str | None = None,
    dataset: str = "default",
    cfg: PrepConfig | None = None,
    overwrite: bool = False,
    on_input: InputCallback | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Shard every input video to ``{out}/{dataset}``; returns the manifest it wrote."""
    cfg = cfg or PrepConfig()
    url = dataset_url(out or default_out(), dataset)
    files = list_inputs(inputs)
    chunks = plan_chunks(files, cfg)
    if on_plan:
        on_plan(len(files), len(chunks))
    claim_dataset(url, cfg, overwrite=overwrite)
    markers = run_chunks(chunks, cfg, url, on_input=on_input)
    return finish_dataset(url, dataset, cfg, markers)
