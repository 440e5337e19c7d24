"""One fsspec root for everything the platform writes (``MARDINI_STORE``).

Local paths and ``s3://bucket/prefix`` work alike. S3 credentials and endpoints come from the
standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for MinIO or moto), never from config files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

DEFAULT_STORE = "./.mardini"
STAGED_JSON = ".*.tmp"  # glob of JSON files being written (local stores only)
log = logging.getLogger(__name__)
T = TypeVar("T")


def store_root(store: str | None = None) -> str:
    """The store URL: the argument, else ``$MARDINI_STORE``, else ``./.mardini``."""
    root = store or os.environ.get("MARDINI_STORE") or DEFAULT_STORE
    return root.rstrip("/")


def filesystem(url: str, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for any fsspec URL; S3 picks up ``AWS_ENDPOINT_URL`` if set."""
    if (
        url.startswith("s3://")
        and "endpoint_url" not in options
        and os.environ.get("AWS_ENDPOINT_URL")
    ):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if is_local_url(url):
        options.setdefault("auto_mkdir", True)  # object stores have no directories to make
    return url_to_fs(url, **options)


def is_local_url(url: str) -> bool:
    """Whether ``url`` names the local disk: a plain path or a ``file://`` URL."""
    return "://" not in url or url.startswith("file://")


def join(root: str, *parts: str) -> str:
    """Join URL path parts with ``/`` (works for local paths and object stores alike)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])


def retry(
    transfer: Callable[[], T],
    what: str,
    attempts: int = 5,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
) -> T:
    """Run one object-store ``transfer``, retrying a failure with exponential backoff and
    jitter, at most ``attempts`` times in all (composer's pattern for object stores); the last
    failure is raised. ``what`` names the transfer (URL and direction) in the warnings."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return transfer()
        except FileNotFoundError:
            raise  # a missing object is an answer, not a transient failure
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning(
                "%s failed (attempt %d of %d: %s); retrying in %.1f s",
                what, attempt, attempts, exc, delay,
            )  # fmt: skip
            time.sleep(delay * (1 + random.random() / 2))
            delay = min(2 * delay, max_backoff_s)
    raise AssertionError("unreachable")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk (where a rename is atomic and needs no upload)."""
    return isinstance(fs, LocalFileSystem)


def remove_file(path: str) -> None:
    """Remove a local file if it is there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def publish(staged: str, url: str) -> None:
    """Make a local file appear at ``url`` in one step (rename locally, one upload remotely)."""
    fs, path = filesystem(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.replace(staged, path)
    else:
        fs.put_file(staged, path)
        remove_file(staged)


def write_json(url: str, obj: Any) -> None:
    """Write JSON so a reader sees the old file or the new one, never a torn one."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    fs, path = filesystem(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Hidden staging name; a killed run's leftovers are removed by the next run (STAGED_JSON).
        head, tail = os.path.split(path)
        staged = os.path.join(head, f".{tail}.{uuid.uuid4().hex}.tmp")
        with open(staged, "wb") as handle:
            handle.write(data)
        os.replace(staged, path)
    else:
        fs.pipe_file(path, data)


def read_json(url: str) -> Any | None:
    """The parsed JSON at ``url``, or ``None`` if there is no such file."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
