"""The demo's dataset: real held-out video, synthetic camera motion only in train."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_prep.clips import split_of
from data_prep.config import PrepConfig
from data_prep.demo_data import DEMO_PREP, REAL_CLIPS, real_clips, sources_dir
from data_prep.sharding import shard_videos
from data_prep.synthetic import FOLDER, synthesize, write_synthetic_videos


def test_validation_is_real_video_from_sources_never_trained_on(demo_store):
    manifest = json.loads(Path(demo_store, "shards", "demo", "manifest.json").read_text())
    accepted = [e for e in manifest["inputs"] if e["status"] == "accepted"]
    by_split = {split: [e for e in accepted if e["split"] == split] for split in ("train", "val")}
    assert by_split["val"] and manifest["splits"]["val"]["clips"] > 0
    assert not any(e["synthetic"] for e in by_split["val"])
    synthetic = [e for e in accepted if e["synthetic"]]
    assert synthetic and all(e["split"] == "train" for e in synthetic)
    assert all(e["name"].startswith(f"{FOLDER}/") for e in synthetic)
    real = {e["name"] for e in accepted if not e["synthetic"]}
    assert real == set(REAL_CLIPS)  # carphone_distorted (a copy of carphone) is not used
    val_sources = {e["name"] for e in by_split["val"]}
    assert not val_sources & {e["name"] for e in by_split["train"]}
    # More clips to learn from than the real videos alone give (issue 12: ~150 frames).
    assert manifest["splits"]["train"]["clips"] > 10 * manifest["splits"]["val"]["clips"]


def test_synthetic_sources_always_train():
    names = [f"{FOLDER}/photo-{k}.mp4" for k in range(50)]
    assert {split_of(n, 0.5) for n in names} == {"train", "val"}  # the hash would split them
    assert {split_of(n, 0.5, synthetic=True) for n in names} == {"train"}


def test_synthetic_rendering_is_idempotent(demo_store):
    folder = sources_dir(demo_store)
    before = {p: p.stat().st_mtime_ns for p in (folder / FOLDER).glob("*.mp4")}
    again = write_synthetic_videos(folder)
    assert {p: p.stat().st_mtime_ns for p in again} == before
    assert not list((folder / FOLDER).glob(".*"))  # no partial file left behind


def test_synthesized_video_moves_over_a_real_photograph():
    photo = torch.rand(3, 96, 128) * 2 - 1
    video = synthesize(photo, frames=8, size=32, seed=3)
    assert video.shape == (8, 3, 32, 32)
    assert video.min() >= -1 and video.max() <= 1
    steps = (video[1:] - video[:-1]).abs().flatten(1).mean(1)
    assert (steps > 1e-3).all()  # the camera moves every frame
    torch.testing.assert_close(video, synthesize(photo, frames=8, size=32, seed=3))


def test_every_demo_rank_reads_train_shards_of_its_own(demo_store):
    manifest = json.loads(Path(demo_store, "shards", "demo", "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] >= 2  # the demo trains on 2 ranks


def test_one_chunk_of_demo_inputs_still_makes_a_train_shard_per_rank(demo_store, tmp_path):
    # Chunk boundaries hash the inputs' URLs (which hold the store's path): in the worst case
    # every input lands in one chunk, and the shard size alone must split the train clips.
    cfg = PrepConfig(**{**DEMO_PREP, "chunk_inputs": 10**9})
    inputs = real_clips() + [str(sources_dir(demo_store))]
    manifest = shard_videos(inputs, out=str(tmp_path), dataset="one-chunk", cfg=cfg)
    assert len(manifest["chunks"]) == 1
    assert manifest["splits"]["train"]["shards"] >= 2


def test_demo_dataset_cut_with_older_settings_is_cut_again(tmp_path):
    from data_prep.demo_data import demo_dataset

    store = str(tmp_path)
    old = PrepConfig(**{**DEMO_PREP, "shard_max_samples": 5000})
    shard_videos(real_clips()[:1], out=f"{store}/shards", dataset="demo", cfg=old)
    manifest = demo_dataset(f"{store}/shards", store, per_photo=1)
    assert manifest["fingerprint"] == PrepConfig(**DEMO_PREP).fingerprint()
