"""Finding and reading WebDataset shards over fsspec (local paths and ``s3://`` alike).

A split lives at ``{shards}/{split}/shard-NNNNNN.tar``; one sample is one clip:
``{"__key__", "mp4": H.264 bytes, "json": {"source", "start", "fps", "size", "frames", ...}}``.
Samples come out *undecoded* (raw bytes): the loader skips and shuffles them cheaply and
decodes only the ones it hands to the model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import webdataset as wds

from mardini.storage import filesystem, is_local_url, join

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-*.tar"
# Shards being written are hidden under this prefix: SHARD_PATTERN never matches them.
STAGING_PREFIX = ".shard-"
# Written last by ``mardini prep shard`` beside the splits; ``config`` holds the prep settings.
MANIFEST = "manifest.json"
# s3fs reads ahead this much per request; shards are read front to back exactly once.
_READ_BLOCK = 16 * 2**20

RawSample = dict[str, Any]
# Members webdataset's tar reader drops (metadata such as __index__): not part of any sample.
_SKIPPED = r"__[^/]*__($|/)"


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with a fixed time and mode, so equal contents make equal shard bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def split_url(shards: str, split: str) -> str:
    """The URL of one split's directory: ``{shards}/{split}``."""
    if not shards:
        raise ValueError("shards URL is empty: set data.shards or MARDINI_STORE")
    return join(shards, split)


def list_shards(shards: str, split: str) -> list[str]:
    """Sorted URLs of ``{shards}/{split}/shard-*.tar``; raises if there are none."""
    url = split_url(shards, split)
    fs, path = filesystem(url)
    found = sorted(fs.glob(join(path, SHARD_PATTERN)))
    if not found:
        raise FileNotFoundError(
            f"no shards at {join(url, SHARD_PATTERN)}: write them with `mardini prep` "
            f"(or `python -m data_prep`), or point data.shards / MARDINI_STORE at them"
        )
    # Local paths stay plain; remote ones get their protocol back (glob strips it).
    urls = [p if is_local_url(url) else fs.unstrip_protocol(p) for p in found]
    log.info("%d shards in %s", len(urls), url)
    return urls


def read_manifest(shards: str) -> dict[str, Any] | None:
    """A dataset's ``manifest.json`` (``mardini prep shard`` writes it last), or None."""
    fs, path = filesystem(join(shards, MANIFEST))
    try:
        with fs.open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def clip_size(shards: str, split: str) -> tuple[int, str]:
    """The side in px of a dataset's (square) clips, and where it was read: the manifest's
    prep config when there is a manifest, else the first sample of ``split`` (its json
    ``size``, else its video stream), as for shards written by hand."""
    size = ((read_manifest(shards) or {}).get("config") or {}).get("size")
    if size:
        return int(size), join(shards, MANIFEST)
    url = list_shards(shards, split)[0]
    with contextlib.closing(shard_samples(url)) as samples:
        first = next(samples)
    where = f"{url}#{first['__key__']}"
    size = json.loads(first.get("json") or b"{}").get("size")
    if size:
        return int(size), where
    import av  # only shards without a size in their json need it

    with av.open(io.BytesIO(first["mp4"])) as container:
        stream = container.streams.video[0]
        return min(stream.codec_context.width, stream.codec_context.height), where


def shard_samples(url: str, start: int = 0) -> Iterator[RawSample]:
    """Raw samples of one shard, in tar order, from sample ``start`` on; raises naming the
    shard if it holds none. The samples before ``start`` are passed over by their tar headers
    (seeks), their data never read."""
    fs, path = filesystem(url)
    count = 0
    with fs.open(path, "rb", block_size=_READ_BLOCK) as stream:
        if start:
            offset = _sample_offset(stream, start)
            if offset is None:  # the shard has no more than ``start`` samples
                return
            stream.seek(offset)
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for sample in wds.tariterators.group_by_keys(files):
            count += 1
            yield sample
    if count == 0 and start == 0:
        # An endless resampler would spin forever on an empty shard; say which one it is.
        raise ValueError(f"{url}: shard holds no samples; delete it or re-run prep for it")


def _sample_offset(stream: Any, index: int) -> int | None:
    """Byte offset of the tar header that begins sample ``index`` (0-based), found by reading
    headers only and grouping member names as webdataset does; None past the last sample."""
    samples, key = -1, None
    with tarfile.open(fileobj=stream, mode="r:") as tar:
        for info in tar:  # a seekable stream: TarFile seeks over each member's data
            name = info.name
            if not info.isreg() or re.match(_SKIPPED, name):
                continue
            prefix, _ = wds.tariterators.base_plus_ext(name)
            if prefix is None:
                continue
            if prefix != key:
                samples, key = samples + 1, prefix
                if samples == index:
                    return info.offset
    return None
