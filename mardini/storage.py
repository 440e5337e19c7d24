"""One fsspec root for everything the platform writes (``MARDINI_STORE``).

Local paths and ``s3://bucket/prefix`` work alike. S3 credentials and endpoints come from the
standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for MinIO or moto), never from config files.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs

DEFAULT_STORE = "./.mardini"


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
    if "://" not in url or url.startswith("file://"):
        options.setdefault("auto_mkdir", True)  # object stores have no directories to make
    return url_to_fs(url, **options)


def join(root: str, *parts: str) -> str:
    """Join URL path parts with ``/`` (works for local paths and object stores alike)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])
