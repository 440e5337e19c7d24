"""The streaming loader on real WebDataset shards cut from real clips, local and on moto S3."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import webdataset as wds

import mardini.data.loader as loader_module
from mardini.data import list_shards, train_batches, train_loader, val_batches, val_loader
from mardini.data.clips import ClipSpec
from mardini.data.loader import (
    FrameBatch,
    SharedMemoryError,
    TrainClips,
    check_shm,
    sample_bytes,
    shm_bytes,
)
from mardini.data.shards import shard_samples
from mardini.storage import filesystem, join
from mardini.video import read_video, resize_center_crop, write_video

CLIP_FPS, CLIP_FRAMES, CLIP_SIZE = 8, 8, 32
# split -> samples per shard; "val-few" has fewer shards than the 4 readers of the val test.
LAYOUT = {"train": [6, 6, 6, 6], "val": [3, 3, 3, 3, 3], "val-few": [8, 7]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, bikes_path, carphone_path) -> dict:
    """Shards as prep writes them: 8-frame 32 px clips at 8 fps cut at many start times."""
    root = tmp_path_factory.mktemp("shards")
    clips = []
    for name, path, step in (("bikes", bikes_path, 3), ("carphone", carphone_path, 2)):
        video = read_video(path, frames=32, fps=CLIP_FPS, size=CLIP_SIZE)  # 32 3 32 32
        for start in range(0, len(video) - CLIP_FRAMES + 1, step):
            mp4 = write_video(root / "tmp.mp4", video[start : start + CLIP_FRAMES], CLIP_FPS)
            clips.append((f"{name}-f{start:03d}", name, start, mp4.read_bytes()))
    (root / "tmp.mp4").unlink()
    mp4s, keys = {}, {}
    cycle = itertools.cycle(clips)
    for split, sizes in LAYOUT.items():
        keys[split] = []
        for index, size in enumerate(sizes):
            (root / split).mkdir(exist_ok=True)
            with wds.TarWriter(str(root / split / f"shard-{index:06d}.tar")) as tar:
                for _ in range(size):
                    clip_key, source, start, data = next(cycle)
                    key = f"{split}-{len(keys[split]):03d}-{clip_key}"
                    meta = {
                        "source": source,
                        "start": start / CLIP_FPS,
                        "fps": CLIP_FPS,
                        "size": CLIP_SIZE,
                        "frames": CLIP_FRAMES,
                        "scores": {},
                    }
                    tar.write({"__key__": key, "mp4": data, "json": meta})
                    keys[split].append(key)
                    mp4s[key] = data
    return {"root": str(root), "mp4": mp4s, "keys": keys}


def _direct(mp4: bytes, tmp_path: Path) -> torch.Tensor:
    """Decode a sample's clip with mardini.video.read_video, all frames: ``T 3 H W``."""
    path = tmp_path / "direct.mp4"
    path.write_bytes(mp4)
    return read_video(path)


def _take(batches, n: int) -> list:
    return list(itertools.islice(batches, n))


@pytest.mark.parametrize(
    ("fps", "resolution", "workers"), [(4.0, 32, 0), (8.0, 16, 0), (8.0, 16, 2)]
)
def test_train_batches_match_direct_decoding(shards, tmp_path, fps, resolution, workers):
    """Bit for bit what read_video (floats from the start) gives, resized or not, whether the
    frames were decoded here or came from workers as uint8."""
    spec = {"frames": 4, "resolution": resolution, "fps": fps}
    stride = int(CLIP_FPS / fps)
    batches = _take(
        train_batches(shards["root"], **spec, micro_batch=3, seed=0, workers=workers), 4
    )
    starts = []
    for keys, video, _ in batches:  # the third field: the lane state
        assert video.shape == (3, 4, 3, resolution, resolution) and video.dtype == torch.float32
        assert -1.0 <= video.min() and video.max() <= 1.0 and video.std() > 0.05
        for key, clip_TCHW in zip(keys, video, strict=True):
            full_TCHW = _direct(shards["mp4"][key], tmp_path)
            span = 3 * stride + 1
            matches = [
                start
                for start in range(CLIP_FRAMES - span + 1)
                if torch.equal(
                    clip_TCHW,
                    resize_center_crop(full_TCHW[start : start + span : stride], resolution),
                )
            ]
            assert matches, f"{key}: no window of the clip equals the batch"
            starts += matches
    # Windows are drawn at random: 12 clips do not all start at the same frame.
    assert len(set(starts)) > 1


def test_val_is_ordered_and_matches_direct_decoding(shards, tmp_path):
    batches = list(val_batches(shards["root"], frames=5, resolution=32, fps=8.0, batch=4))
    assert [k for b in batches for k in b.keys] == shards["keys"]["val"]
    assert [len(b.keys) for b in batches] == [4, 4, 4, 3]
    key, clip = batches[-1].keys[-1], batches[-1].video[-1]
    assert torch.equal(clip, _direct(shards["mp4"][key], tmp_path)[:5])
    tensors = list(val_loader(shards["root"], frames=5, resolution=32, fps=8.0, batch=4))
    assert all(torch.equal(t, b.video) for t, b in zip(tensors, batches, strict=True))


@pytest.mark.parametrize("split", ["val", "val-few"])
def test_val_ranks_and_workers_cover_split_exactly_once(shards, split):
    per_rank = []
    for rank in range(2):
        batches = val_batches(
            shards["root"],
            frames=4,
            resolution=32,
            fps=8.0,
            batch=2,
            rank=rank,
            world_size=2,
            workers=2,
            split=split,
        )
        per_rank.append([k for b in batches for k in b.keys])
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == len(shards["keys"][split])
    assert set(seen) == set(shards["keys"][split])
    assert per_rank[0] and per_rank[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_uninterrupted_batches(shards, workers):
    steps, k = 12, 5
    reference = _take(
        train_batches(shards["root"], frames=4, resolution=32, fps=4.0, micro_batch=2), steps
    )
    args = {"frames": 4, "resolution": 32, "fps": 4.0, "micro_batch": 2, "workers": workers}
    uninterrupted = _take(train_batches(shards["root"], **args), steps)
    resumed = _take(train_batches(shards["root"], **args, start_step=k), steps - k)
    for step, (a, b) in enumerate(zip(uninterrupted, reference, strict=True)):
        assert a.keys == b.keys and torch.equal(a.video, b.video), f"step {step}"
    for step, b in enumerate(resumed, start=k):
        assert b.keys == reference[step].keys and torch.equal(b.video, reference[step].video)
    # A resumed stream is not the stream from step 0.
    assert resumed[0].keys != reference[0].keys or not torch.equal(
        resumed[0].video, reference[0].video
    )


def test_resume_does_not_decode_skipped_samples(shards, monkeypatch):
    decoded: list[int] = []
    real = loader_module.decode_frames
    monkeypatch.setattr(
        loader_module, "decode_frames", lambda *a, **kw: decoded.append(1) or real(*a, **kw)
    )
    stream = train_batches(
        shards["root"], frames=4, resolution=32, fps=4.0, micro_batch=2, start_step=40
    )
    next(stream)
    assert len(decoded) == 2  # one batch decoded, the 80 samples before it only read


def test_seeds_and_ranks_give_different_orders(shards):
    args = {"frames": 4, "resolution": 32, "fps": 4.0, "micro_batch": 2}

    def keys(**kw) -> list[str]:
        return [k for b in _take(train_batches(shards["root"], **args, **kw), 6) for k in b.keys]

    assert keys(seed=0) == keys(seed=0)
    assert keys(seed=0) != keys(seed=1)
    rank0, rank1 = keys(rank=0, world_size=2), keys(rank=1, world_size=2)
    # Four shards over two ranks: each rank reads its own two shards.
    assert rank0 != rank1 and not set(rank0) & set(rank1)


@pytest.mark.slow
def test_s3_shards_give_the_local_batches(shards, s3_bucket):
    fs, bucket = filesystem(s3_bucket)
    local = Path(shards["root"])
    for tar in sorted(local.rglob("*.tar")):
        fs.put_file(str(tar), join(bucket, "shards", str(tar.relative_to(local))))
    remote = join(s3_bucket, "shards")
    assert list_shards(remote, "train")[0] == join(remote, "train", "shard-000000.tar")

    args = {"frames": 4, "resolution": 32, "fps": 4.0, "micro_batch": 2}
    from_local = _take(train_batches(shards["root"], **args), 6)
    from_s3 = _take(train_batches(remote, **args, workers=2), 6)
    for a, b in zip(from_local, from_s3, strict=True):
        assert a.keys == b.keys and torch.equal(a.video, b.video)

    tensors = _take(train_loader(remote, **args), 2)
    assert all(torch.equal(t, b.video) for t, b in zip(tensors, from_local[:2], strict=True))
    val = [
        k for b in val_batches(remote, frames=4, resolution=32, fps=8.0, batch=4) for k in b.keys
    ]
    assert val == shards["keys"]["val"]


def test_missing_split_or_url_is_named(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/nope/shard-")):
        list_shards(str(tmp_path), "nope")
    with pytest.raises(FileNotFoundError, match=r"/test/shard-\*\.tar"):
        train_loader(shards["root"], frames=4, resolution=32, fps=4.0, micro_batch=2, split="test")
    with pytest.raises(ValueError, match="shards URL is empty"):
        val_loader("", frames=4, resolution=32, fps=8.0, batch=2)


def test_missing_split_on_s3_is_named(s3_bucket):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{s3_bucket}/shards/train/shard-")):
        list_shards(f"{s3_bucket}/shards", "train")


@pytest.mark.parametrize(
    ("frames", "fps", "message"),
    [(4, 3.0, "not an integer multiple"), (4, 16.0, "not an integer multiple"), (5, 4.0, "span 9")],
)
def test_clips_that_cannot_serve_the_stage_are_named(shards, frames, fps, message):
    with pytest.raises(ValueError, match=message) as err:
        train_loader(shards["root"], frames=frames, resolution=32, fps=fps, micro_batch=2)
    assert "train/shard-000000.tar#train-000-" in str(err.value)


def _lane_states(batches) -> dict[int, dict]:
    """What the trainer keeps: each lane's state after the last batch handed out."""
    states: dict[int, dict] = {}
    for batch in batches:
        lane, state = batch.lane_state
        states[lane] = state
    return states


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_saved_lane_states_seeks_instead_of_reading(shards, workers):
    """With the lane states a checkpoint keeps, resuming at step k reads the shuffle buffers
    again and seeks: as many samples read at step 60 (five epochs in) as at step 6, and the
    batches are the uninterrupted stream's, bit for bit."""
    urls = list_shards(shards["root"], "train")
    spec = ClipSpec(frames=4, resolution=32, fps=4.0)
    args = {"micro_batch": 2, "seed": 0, "rank": 0, "world_size": 1, "shuffle_buffer": 4}
    reference = _take(iter(TrainClips(urls, spec, lanes=2, **args)), 64)
    reads = {}
    for k in (6, 60):
        states = _lane_states(reference[:k])
        # Saved as a checkpoint saves them (JSON), read back with string keys.
        states = json.loads(json.dumps(states))
        clips = TrainClips(urls, spec, lanes=2, start_step=k, lane_states=states, **args)
        resumed = _take(iter(clips), 4)
        for step, batch in enumerate(resumed, start=k):
            assert batch.keys == reference[step].keys, f"step {step}"
            assert torch.equal(batch.frames, reference[step].frames), f"step {step}"
        reads[k] = clips.samples_read
        replay = TrainClips(urls, spec, lanes=2, start_step=k, **args)
        _take(iter(replay), 4)
        reads[f"replay {k}"] = replay.samples_read
    assert reads[60] == reads[6], reads
    # Without the states a resume reads every sample it skips (here 14 vs 134 at step 60).
    assert reads["replay 60"] - reads["replay 6"] >= (60 - 6) * 2, reads
    # And through DataLoader workers, as the trainer runs it.
    states = _lane_states(reference[:60])
    loader = train_batches(
        shards["root"], frames=4, resolution=32, fps=4.0, micro_batch=2, shuffle_buffer=4,
        lanes=2, start_step=60, workers=workers, lane_states=states,
    )  # fmt: skip
    for step, batch in enumerate(_take(loader, 4), start=60):
        assert batch.keys == reference[step].keys and torch.equal(
            batch.video, reference[step].to_batch(32).video
        )


def test_a_shard_read_from_a_sample_on_skips_the_ones_before(shards):
    url = list_shards(shards["root"], "train")[1]
    every = [s["__key__"] for s in shard_samples(url)]
    assert [s["__key__"] for s in shard_samples(url, start=4)] == every[4:]
    assert list(shard_samples(url, start=len(every))) == []


def test_workers_hand_over_uint8_frames_at_the_clips_own_size(shards):
    """What crosses the worker boundary is the stored frames (a quarter of float32's bytes);
    the clips made from them in this process equal the ones decoded in the worker's place."""
    urls = list_shards(shards["root"], "train")
    spec = ClipSpec(frames=4, resolution=16, fps=8.0)
    clips = TrainClips(urls, spec, micro_batch=2, seed=0, rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(
        clips, batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    from_worker = _take(iter(loader), 2)
    for batch in from_worker:
        assert isinstance(batch, FrameBatch)
        assert batch.frames.dtype == torch.uint8
        assert batch.frames.shape == (2, 4, 3, CLIP_SIZE, CLIP_SIZE)
    streamed = _take(train_batches(shards["root"], frames=4, resolution=16, fps=8.0, micro_batch=2), 2)  # fmt: skip
    for frames, batch in zip(from_worker, streamed, strict=True):
        clip = frames.to_batch(16)
        assert clip.keys == batch.keys and torch.equal(clip.video, batch.video)
        assert clip.video.dtype == torch.float32 and clip.video.shape == (2, 4, 3, 16, 16)
    # One sample as a worker hands it over: 4 frames x 3 x 32 x 32 bytes, whatever the stage size.
    args = {"frames": 4, "resolution": 16, "fps": 8.0}
    assert sample_bytes(shards["root"], "train", **args) == 4 * 3 * CLIP_SIZE**2


def test_shm_budget_counts_every_rank_worker_and_prefetched_batch():
    # paper.yaml's joint-1024 stage on an 8-GPU node: 17 frames of 1024 px, micro_batch 4,
    # 8 workers, prefetch 2; each worker's 2 waiting batches plus the one the trainer holds.
    clip = 17 * 3 * 1024 * 1024
    paper = {"ranks": 8, "workers": 8, "prefetch": 2, "batch": 4}
    assert shm_bytes(**paper, sample_bytes=clip) == 8 * 17 * 4 * clip  # uint8: 27.1 GiB
    assert shm_bytes(**paper, sample_bytes=4 * clip) / 2**30 == pytest.approx(108.4, abs=0.1)
    assert shm_bytes(**{**paper, "workers": 0}, sample_bytes=clip) == 0
    assert shm_bytes(**{**paper, "prefetch": 1}, sample_bytes=clip) == 8 * 9 * 4 * clip


def test_a_loader_budget_over_the_free_shared_memory_is_refused(tmp_path):
    paper = {"ranks": 8, "workers": 8, "prefetch": 2, "batch": 4, "sample_bytes": 17 * 3 * 2**20}
    with pytest.raises(SharedMemoryError) as err:
        check_shm(**paper, free=16 * 2**30)
    message = str(err.value)
    for part in ("8 rank(s)", "8 workers", "prefetch 2", "micro_batch 4", "27.1 GiB", "16.00 GiB"):
        assert part in message, message
    assert "data.workers" in message and "data.prefetch" in message and "/dev/shm" in message
    assert check_shm(**paper, free=64 * 2**30) == shm_bytes(**paper)
    # Measured with statvfs on a real file system when no size is given.
    assert check_shm(**{**paper, "sample_bytes": 1}, path=str(tmp_path)) == 8 * 17 * 4
    with pytest.raises(SharedMemoryError, match=str(tmp_path)):
        check_shm(**{**paper, "sample_bytes": 2**50}, path=str(tmp_path))
    assert check_shm(**{**paper, "workers": 0}, free=0) == 0  # no workers, no shared memory
