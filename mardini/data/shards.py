"""Finding and reading WebDataset shards over fsspec (local paths and ``s3://`` alike).

A split lives at ``{shards}/{split}/shard-NNNNNN.tar``; one sample is one clip:
``{"__key__", "mp4": H.264 bytes, "json": {"source", "start", "fps", "size", "frames", ...}}``.
Samples come out *undecoded* (raw bytes): the loader skips and shuffles them cheaply and
decodes only the ones it hands to the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import webdataset as wds

from mardini.storage import filesystem, join

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-*.tar"
# s3fs reads ahead this much per request; shards are read front to back exactly once.
_READ_BLOCK = 16 * 2**20

RawSample = dict[str, Any]


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
    urls = [p if "://" not in url else fs.unstrip_protocol(p) for p in found]
    log.info("%d shards in %s", len(urls), url)
    return urls


def shard_samples(url: str) -> Iterator[RawSample]:
    """Raw samples of one shard, in tar order; raises naming the shard if it holds none."""
    fs, path = filesystem(url)
    count = 0
    with fs.open(path, "rb", block_size=_READ_BLOCK) as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for sample in wds.tariterators.group_by_keys(files):
            count += 1
            yield sample
    if count == 0:
        # An endless resampler would spin forever on an empty shard; say which one it is.
        raise ValueError(f"{url}: shard holds no samples; delete it or re-run prep for it")
