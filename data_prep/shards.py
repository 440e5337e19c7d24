"""Writing WebDataset tar shards and JSON records so that readers never see half a file.

A shard is written under a hidden staging name and published in one step: ``os.replace`` on a
local disk, one PUT (or a multipart upload, invisible until complete) on an object store.
Tar headers carry fixed times and owners, so the same clips always make the same shard bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import uuid
from dataclasses import dataclass
from typing import Any

from mardini.data.shards import STAGING_PREFIX, tar_add
from mardini.storage import remove_file

log = logging.getLogger(__name__)

_BLOCK = 512


def shard_name(split: str, chunk_key: str, part: int) -> str:
    """Path of a shard relative to the dataset: ``{split}/shard-{chunk}-{part}.tar``."""
    return f"{split}/shard-{chunk_key}-{part:03d}.tar"


@dataclass
class StagedShard:
    """A finished tar part waiting to be published: where it is and what it holds."""

    name: str  # relative to the dataset URL
    staged: str  # local file
    split: str
    clips: int
    bytes: int
    sha256: str


class SplitWriter:
    """Rolls one split's samples into tar parts bounded by size and sample count."""

    def __init__(
        self,
        split: str,
        chunk_key: str,
        staging_dir: str,
        max_bytes: int,
        max_samples: int,
    ) -> None:
        self.split, self.chunk_key, self.staging_dir = split, chunk_key, staging_dir
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.done: list[StagedShard] = []
        self._tar: tarfile.TarFile | None = None
        self._path = ""
        self._count = 0
        self._bytes = 0

    def add(self, key: str, mp4: bytes, meta: dict[str, Any]) -> None:
        """Append one sample (``key.mp4`` + ``key.json``), starting a new part when full."""
        payload = json.dumps(meta, sort_keys=True).encode()
        size = sum(_BLOCK + -(-len(b) // _BLOCK) * _BLOCK for b in (mp4, payload))
        if self._tar is not None and (
            self._count >= self.max_samples or self._bytes + size > self.max_bytes
        ):
            self._close_part()
        if self._tar is None:
            name = shard_name(self.split, self.chunk_key, len(self.done))
            self._path = os.path.join(
                self.staging_dir, f"{STAGING_PREFIX}{os.path.basename(name)}.{uuid.uuid4().hex}"
            )
            os.makedirs(self.staging_dir, exist_ok=True)
            self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)
        for ext, data in (("mp4", mp4), ("json", payload)):
            tar_add(self._tar, f"{key}.{ext}", data)
        self._count += 1
        self._bytes += size

    def close(self) -> list[StagedShard]:
        """Finish the open part; return every part of this split."""
        if self._tar is not None:
            self._close_part()
        return self.done

    def discard(self) -> None:
        """Drop the open part and every staged file (after a failure)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            remove_file(self._path)
        for shard in self.done:
            remove_file(shard.staged)

    def _close_part(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        self.done.append(
            StagedShard(
                name=shard_name(self.split, self.chunk_key, len(self.done)),
                staged=self._path,
                split=self.split,
                clips=self._count,
                bytes=os.path.getsize(self._path),
                sha256=_sha256(self._path),
            )
        )
        self._count = self._bytes = 0


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
