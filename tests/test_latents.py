"""The latent cache: shards of precomputed autoencoder latents written beside real mp4 shards,
read back by the loader as the model would have computed them, locally and on moto S3."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mardini.autoencoder import encode_pair, fingerprint
from mardini.config import load_config
from mardini.data import ClipSpec, LatentBatch, decode_clip, shard_samples, train_batches
from mardini.data.latent_cache import LatentCacheError, cache_latents
from mardini.data.latents import CACHE_RECORD, HI, cache_url, decode_latents
from mardini.export import stage_autoencoder
from mardini.models import build_model
from mardini.storage import filesystem, join
from mardini.train.engine import latent_source
from tests.conftest import CONFIGS

# A KL autoencoder small enough for CPU: 4 channels, 2x downsampling (weights seeded).
SMALL_KL = {"kind": "kl", "latent_channels": 4, "block_out_channels": [16, 32], "untrained": True}
SPEC = ClipSpec(frames=4, resolution=32, fps=4.0)  # stride 2 over the 8 fps clips


def _config(tmp_path: Path, shards: str, autoencoder: dict | None = None) -> Path:
    raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    raw["name"] = "latents-test"
    raw["model"] = {"preset": "debug", **({"autoencoder": autoencoder} if autoencoder else {})}
    raw["data"] = {"shards": shards, "shuffle_buffer": 4}
    raw["stages"] = [{"name": "dm", "kind": "dm", "frames": 4, "resolution": 32, "fps": 4.0}]
    path = tmp_path / "latents-test.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def shards(tmp_path, train_shards) -> str:
    """A private copy of the session's real-clip shards (the cache is written inside it)."""
    root = tmp_path / "shards"
    shutil.copytree(train_shards, root)
    return str(root)


def _latent_samples(url: str, split: str) -> dict[str, dict]:
    fs, path = filesystem(join(url, split))
    urls = sorted(fs.glob(join(path, "shard-*.tar")))
    urls = [u if "://" not in url else fs.unstrip_protocol(u) for u in urls]
    return {s["__key__"]: s for u in urls for s in shard_samples(u)}


@pytest.mark.parametrize("kind", ["pixel", "kl"])
def test_cached_latents_equal_the_autoencoders_output(tmp_path, shards, kind):
    cfg = load_config(_config(tmp_path, shards, SMALL_KL if kind == "kl" else None))
    stage = cfg.stage("dm")
    ae = stage_autoencoder(cfg, stage, str(tmp_path / "store"))
    record = cache_latents(shards, ae, planner_downscale=2, resolution=32)
    assert record["splits"]["train"]["clips"] == 6 and record["splits"]["val"]["clips"] == 4

    # The trainer's model has the same autoencoder, so it finds this cache.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    assert fingerprint(model.autoencoder, 2) == record["fingerprint"]
    assert latent_source(cfg, stage, str(tmp_path / "store"), model) == record["url"]

    for split in ("train", "val"):
        mp4 = _latent_samples(shards, split)
        cached = _latent_samples(record["url"], split)
        assert sorted(cached) == sorted(mp4)
        for key, sample in cached.items():
            for start in (0, 1):
                hi, lo = decode_latents(sample, SPEC, start)
                video = decode_clip(mp4[key], SPEC, start)[None]
                want_hi, want_lo = model.encode(video)
                if kind == "pixel":  # identity + area downscale: exact
                    assert torch.equal(hi, want_hi[0]) and torch.equal(lo, want_lo[0])
                else:  # convolutions over 8 frames at once vs 4: float rounding only
                    torch.testing.assert_close(hi, want_hi[0], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(lo, want_lo[0], atol=1e-5, rtol=1e-5)
                assert hi.shape == (
                    4,
                    4 if kind == "kl" else 3,
                    *((16, 16) if kind == "kl" else (32, 32)),
                )


def test_loader_streams_latents_in_the_mp4_order(tmp_path, shards):
    """Same seed, same lanes: batch k from the cache holds the clips and windows of batch k
    from the mp4 shards, as latents; resuming at a step works alike."""
    cfg = load_config(_config(tmp_path, shards))
    ae = stage_autoencoder(cfg, cfg.stage("dm"), str(tmp_path / "store"))
    url = cache_latents(shards, ae, planner_downscale=2, resolution=32)["url"]
    spec = {"frames": 4, "resolution": 32, "fps": 4.0, "micro_batch": 2, "shuffle_buffer": 4}
    from_mp4 = list(itertools.islice(train_batches(shards, **spec, seed=3), 8))
    from_cache = list(itertools.islice(train_batches(url, **spec, seed=3, workers=2), 8))
    for mp4_batch, latent_batch in zip(from_mp4, from_cache, strict=True):
        assert isinstance(latent_batch, LatentBatch)
        assert latent_batch.keys == mp4_batch.keys
        hi, lo = encode_pair(ae, mp4_batch.video, 2)
        assert torch.equal(latent_batch.latents[0], hi) and torch.equal(latent_batch.latents[1], lo)
    resumed = next(train_batches(url, **spec, seed=3, start_step=5))
    assert resumed.keys == from_cache[5].keys
    assert torch.equal(resumed.latents[0], from_cache[5].latents[0])


def test_rerun_skips_done_shards_and_refuses_another_dtype(tmp_path, shards):
    cfg = load_config(_config(tmp_path, shards))
    ae = stage_autoencoder(cfg, cfg.stage("dm"), str(tmp_path / "store"))
    seen: list[tuple[str, bool]] = []
    first = cache_latents(shards, ae, planner_downscale=2, resolution=32)
    url = first["url"]
    fs, root = filesystem(url)
    before = {p: fs.cat_file(p) for p in fs.glob(f"{root}/*/shard-*.tar")}
    assert len(before) == 4
    # A killed run: one latent shard gone, a stale one of a re-cut dataset left behind.
    gone = sorted(before)[0]
    fs.rm(gone)
    fs.pipe_file(f"{root}/train/shard-deadbeef-000.tar", b"stale")
    fs.pipe_file(f"{root}/train/.shard-deadbeef-000.tar.0123", b"staged by a killed run")
    again = cache_latents(
        shards, ae, planner_downscale=2, resolution=32, on_shard=lambda u, n, s: seen.append(s)
    )
    assert sorted(seen) == [False, True, True, True]  # only the missing shard was encoded
    after = {p: fs.cat_file(p) for p in fs.glob(f"{root}/*/shard-*.tar")}
    assert after == before  # same bytes, stale shard deleted
    assert fs.glob(f"{root}/train/.shard-*") == []
    assert {k: v for k, v in again.items() if k != "created"} == {
        k: v for k, v in first.items() if k != "created"
    }
    with pytest.raises(LatentCacheError, match="float32 latents, asked for float16"):
        cache_latents(shards, ae, planner_downscale=2, resolution=32, dtype="float16")
    half = cache_latents(
        shards, ae, planner_downscale=2, resolution=32, dtype="float16", overwrite=True
    )
    sample = next(iter(_latent_samples(half["url"], "train").values()))
    assert json.loads(sample["json"])["latents"]["dtype"] == "float16"
    hi16, _ = decode_latents(sample, SPEC)
    video = decode_clip(_latent_samples(shards, "train")[sample["__key__"]], SPEC)[None]
    torch.testing.assert_close(hi16, encode_pair(ae, video, 2)[0][0], atol=1e-3, rtol=1e-3)


def test_missing_cache_and_wrong_resolution_say_what_to_run(tmp_path, shards):
    cfg = load_config(_config(tmp_path, shards))
    model = build_model(cfg.model)
    with pytest.raises(FileNotFoundError, match="mardini prep latents --config .* --stage dm"):
        latent_source(cfg, cfg.stage("dm"), str(tmp_path / "store"), model)
    ae = stage_autoencoder(cfg, cfg.stage("dm"), str(tmp_path / "store"))
    url = cache_latents(shards, ae, planner_downscale=2, resolution=16)["url"]
    sample = next(iter(_latent_samples(url, "train").values()))
    with pytest.raises(ValueError, match="cached at 16 px, the stage wants 32 px"):
        decode_latents(sample, SPEC)
    with pytest.raises(ValueError, match="cached at 16 px"):
        next(train_batches(url, frames=4, resolution=32, fps=4.0, micro_batch=1))


def test_cache_on_s3_through_the_cli_in_parts(tmp_path, shards, s3_bucket):
    """`mardini prep latents --parts 2` against moto S3, as the pods of an Indexed Job
    run it (the index from JOB_COMPLETION_INDEX): each part encodes its half of the shards,
    the part that finishes last writes the record, and --record-to gets a copy."""
    remote = f"{s3_bucket}/shards"
    fs, _ = filesystem(remote)
    fs.put(shards + "/", remote.removeprefix("s3://") + "/", recursive=True)
    config = _config(tmp_path, remote)
    cfg = load_config(config)
    ae = stage_autoencoder(cfg, cfg.stage("dm"), str(tmp_path))
    url = cache_url(remote, 32, fingerprint(ae, 2))
    record_to = f"{s3_bucket}/runs/latents/key.json"
    cmd = [sys.executable, "-m", "pipelines.cli", "prep", "latents", "--config", str(config), "--stage", "dm",
           "--parts", "2", "--record-to", record_to]  # fmt: skip

    def part(index: int) -> str:
        env = {**os.environ, "JOB_COMPLETION_INDEX": str(index)}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        fs.invalidate_cache()  # written by another process
        return result.stdout

    assert "part 1 of 2 done" in part(1)
    assert not fs.exists(join(url, CACHE_RECORD).removeprefix("s3://"))  # part 0 is missing
    assert len(fs.glob(join(url, "*", "shard-*.tar").removeprefix("s3://"))) == 2  # its half
    assert "train: 6 clips in 2 shards" in part(0)
    record = json.loads(fs.cat_file(join(url, CACHE_RECORD).removeprefix("s3://")))
    assert record["splits"]["val"]["clips"] == 4
    assert json.loads(fs.cat_file(record_to.removeprefix("s3://")))["url"] == url
    batch = next(train_batches(url, frames=4, resolution=32, fps=4.0, micro_batch=2))
    assert batch.latents[0].shape == (2, 4, 3, 32, 32)
    assert all(HI in s for s in _latent_samples(url, "val").values())
    with pytest.raises(LatentCacheError, match="part 2 of 2"):
        cache_latents(remote, ae, planner_downscale=2, resolution=32, part=(2, 2))
