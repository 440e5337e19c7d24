"""Turning command-line inputs (paths, globs, directories, fsspec URLs) into a sorted file list."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from data_prep.config import PrepError
from mardini.storage import filesystem

log = logging.getLogger(__name__)

# Directories are searched recursively for these; globs and explicit files are taken as given,
# so a stray text file named there is *rejected* in the manifest rather than silently skipped.
VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".ts",
    ".mts",
    ".flv",
    ".wmv",
    ".3gp",
    ".ogv",
    ".y4m",
)


@dataclass(frozen=True, order=True)
class InputFile:
    """One source video: its URL, its name relative to the input it was found under, its size."""

    url: str  # absolute local path, or protocol://path for remote stores
    name: str  # relative to the directory/glob root: stable when a dataset folder moves
    size: int


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _glob_root(path: str) -> str:
    """The directory part of a glob before its first wildcard (names are made relative to it)."""
    head = path
    while _is_glob(head):
        head = head.rsplit("/", 1)[0] if "/" in head else ""
    return head


def _unique_names(inputs: list[InputFile]) -> list[InputFile]:
    """Names order the inputs and key their clips (``plan_chunks``, ``sample_key``), so they
    must be unique: two different files found under the same relative name (``a/x.mp4`` and
    ``b/x.mp4`` given as two directories) are told apart by their URLs instead."""
    counts = Counter(inp.name for inp in inputs)
    return [
        inp if counts[inp.name] == 1 else InputFile(url=inp.url, name=inp.url, size=inp.size)
        for inp in inputs
    ]


def list_inputs(
    specs: Sequence[str], extensions: Iterable[str] = VIDEO_EXTENSIONS
) -> list[InputFile]:
    """Expand paths, globs, directories and URLs into unique files sorted by URL."""
    exts = tuple(e.lower() for e in extensions)
    found: dict[str, InputFile] = {}
    for spec in specs:
        fs, path = filesystem(spec)
        local = isinstance(fs, LocalFileSystem)
        if local:
            path = os.path.abspath(path)

        def url_of(p: str, fs=fs, local=local) -> str:
            return p if local else fs.unstrip_protocol(p)

        if _is_glob(path):
            root = _glob_root(path)
            matches = fs.glob(path, detail=True)
            files = {p: info for p, info in matches.items() if info.get("type") == "file"}
            if not files:
                raise PrepError(f"{spec}: the glob matched no files; check the pattern")
        elif fs.isdir(path):
            root = path
            files = {
                p: info
                for p, info in fs.find(path, detail=True).items()
                if p.lower().endswith(exts) and not os.path.basename(p).startswith(".")
            }
            if not files:
                raise PrepError(
                    f"{spec}: directory holds no videos (looked recursively for {', '.join(exts)})"
                )
        elif fs.isfile(path):
            root = path.rsplit("/", 1)[0] if "/" in path else ""
            files = {path: fs.info(path)}
        else:
            raise PrepError(f"{spec}: no such file, directory or glob; check the path or URL")
        for p, info in files.items():
            name = p[len(root) :].lstrip("/") if root and p.startswith(root) else p
            item = InputFile(url=url_of(p), name=name, size=int(info.get("size") or 0))
            # The same file reached through two specs keeps one (deterministic) name.
            if item.url not in found or item.name < found[item.url].name:
                found[item.url] = item
    inputs = _unique_names(sorted(found.values()))
    log.info("%d input files from %d specs", len(inputs), len(specs))
    return inputs
