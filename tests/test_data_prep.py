"""Sharding real clips (bikes, carphone) and made-up bad files: local dirs and moto S3, reruns,
interrupted and killed runs. Real PyAV, real webdataset, real S3 API; nothing is mocked."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from data_prep import (
    InputFile,
    PrepConfig,
    PrepError,
    list_inputs,
    plan_chunks,
    process_video,
    shard_videos,
    split_of,
)
from data_prep.cli import app
from data_prep.clips import sample_key, split_score
from data_prep.sharding import _results
from mardini.storage import filesystem, join

REPO = Path(__file__).resolve().parents[1]
SMALL = {"fps": 8.0, "frames": 8, "size": 32}
# Cuts PySceneDetect finds in bikes.mp4 (seconds); a clip must never span one.
BIKES_CUTS = (1.2, 3.04, 5.48, 7.48, 9.68)


def _cfg(**fields) -> PrepConfig:
    return PrepConfig(**{**SMALL, "workers": 1, **fields})


def _samples(url: str, split: str) -> dict[str, dict]:
    """Every sample of a split read back with webdataset over fsspec: key -> sample."""
    import webdataset as wds  # imports torch: not at module level, which pool processes import

    fs, path = filesystem(join(url, split))
    out: dict[str, dict] = {}
    for shard in sorted(fs.glob(join(path, "shard-*.tar"))):
        with fs.open(shard, "rb") as stream:
            files = wds.tariterators.tar_file_expander([{"url": shard, "stream": stream}])
            for sample in wds.tariterators.group_by_keys(files):
                assert sample["__key__"] not in out, f"duplicate key {sample['__key__']}"
                out[sample["__key__"]] = sample
    return out


def _decode(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _clip_hashes(url: str) -> dict[str, str]:
    """key -> sha256 of the mp4 bytes, over both splits (what 'the same clips' means)."""
    return {
        key: hashlib.sha256(sample["mp4"]).hexdigest()
        for split in ("train", "val")
        for key, sample in _samples(url, split).items()
    }


def _listing(url: str) -> list[str]:
    fs, path = filesystem(url)
    return sorted(p[len(path) :].lstrip("/") for p in fs.find(path))


def _without_time(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created", "url")}


def _check_dataset(url: str, manifest: dict, cfg: PrepConfig) -> dict[str, dict]:
    """Read everything back; check clip shape, the split rule and that the manifest reconciles."""
    counts = manifest["counts"]
    assert counts["inputs"] == counts["accepted"] + counts["rejected"] == len(manifest["inputs"])
    samples = {}
    for split in ("train", "val"):
        for key, sample in _samples(url, split).items():
            meta = json.loads(sample["json"])
            assert split_of(meta["name"], cfg.val_fraction) == split, "source in the wrong split"
            video = _decode(sample["mp4"])
            assert video.shape == (cfg.frames, cfg.size, cfg.size, 3), key
            assert (meta["fps"], meta["frames"], meta["size"]) == (cfg.fps, cfg.frames, cfg.size)
            assert meta["scores"]["motion"] >= cfg.motion_threshold
            samples[key] = {**sample, "meta": meta, "split": split}
    assert len(samples) == counts["clips"] == sum(e["clips"] for e in manifest["inputs"])
    listed = sorted(s["path"] for s in manifest["shards"])
    assert listed == [p for p in _listing(url) if p.endswith(".tar")]
    by_source: dict[str, set[str]] = {}
    for sample in samples.values():
        by_source.setdefault(sample["meta"]["source"], set()).add(sample["split"])
    assert all(len(splits) == 1 for splits in by_source.values()), by_source
    return samples


# ----------------------------------------------------------------------------- real clips


@pytest.mark.slow
def test_shard_real_clips_local_and_s3(tmp_path, s3_bucket, bikes_path, carphone_path):
    # A val fraction between the two sources' scores puts exactly one of them in val.
    scores = sorted(split_score(p.name) for p in (bikes_path, carphone_path))
    cfg = _cfg(val_fraction=sum(scores) / 2)
    inputs = [str(bikes_path), str(carphone_path)]
    results = {}
    for out in (str(tmp_path / "shards"), join(s3_bucket, "prefix")):
        manifest = shard_videos(inputs, out=out, dataset="clips", cfg=cfg)
        url = join(out, "clips")
        fs, path = filesystem(join(url, "manifest.json"))
        assert _without_time(json.loads(fs.cat_file(path))) == _without_time(manifest)
        samples = _check_dataset(url, manifest, cfg)
        assert manifest["counts"] == {
            "inputs": 2,
            "accepted": 2,
            "rejected": 0,
            "clips": len(samples),
            "synthetic": 0,
            "shards": 2,
            "bytes": manifest["counts"]["bytes"],
            "rejected_by_reason": {},
        }
        assert {s["split"] for s in samples.values()} == {"train", "val"}
        bikes = [s["meta"] for s in samples.values() if s["meta"]["name"] == "bikes.mp4"]
        for meta in bikes:  # no clip spans a scene cut
            end = meta["start"] + (cfg.frames - 1) / cfg.fps
            assert not any(meta["start"] < cut <= end for cut in BIKES_CUTS), meta
        entry = next(e for e in manifest["inputs"] if e["name"] == "bikes.mp4")
        assert entry["stats"]["scenes"] == len(BIKES_CUTS) + 1
        results[out] = {k: hashlib.sha256(s["mp4"]).hexdigest() for k, s in samples.items()}
    local, remote = results.values()
    assert local == remote and len(local) >= 10  # same bytes whatever the store


def test_s3_inputs_directory_and_glob(tmp_path, s3_bucket, carphone_path):
    fs, root = filesystem(join(s3_bucket, "raw"))
    fs.put_file(str(carphone_path), join(root, "a", "carphone.mp4"))
    fs.pipe_file(join(root, "a", "notes.txt"), b"not a video")
    found = list_inputs([join(s3_bucket, "raw")])  # directories keep video extensions only
    assert [(f.url, f.name) for f in found] == [
        (join(s3_bucket, "raw/a/carphone.mp4"), "a/carphone.mp4")
    ]
    assert len(list_inputs([join(s3_bucket, "raw/a/*")])) == 2  # a glob takes what it matches
    manifest = shard_videos([join(s3_bucket, "raw")], out=str(tmp_path), dataset="d", cfg=_cfg())
    assert manifest["counts"]["accepted"] == 1 and manifest["counts"]["clips"] == 4
    with pytest.raises(PrepError, match="no such file"):
        list_inputs([join(s3_bucket, "missing.mp4")])


# ----------------------------------------------------------------------------- bad inputs


def _bad_inputs(folder: Path, bikes_path: Path) -> dict[str, str]:
    """Files that must each be rejected, mapped to the reason they must be rejected for."""
    import torch

    from mardini.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.mp4").write_bytes(b"")
    data = bikes_path.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "text.mp4").write_text("this is a shopping list, not a video\n" * 20)
    with av.open(str(folder / "image.png"), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width = stream.height = 32
        stream.pix_fmt = "rgb24"
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 90, np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    rng = torch.Generator().manual_seed(0)
    still = torch.rand(1, 3, 64, 64, generator=rng) * 2 - 1
    write_video(folder / "one_frame.mp4", still, fps=8)
    write_video(folder / "static.mp4", still.repeat(40, 1, 1, 1), fps=8)
    # A real YUV4MPEG2 file whose header declares 16000x16000 frames: FFmpeg opens it and
    # reports those dimensions; decoding one frame would need 384 MB.
    header = b"YUV4MPEG2 W16000 H16000 F8:1 Ip A1:1 C420jpeg\nFRAME\n"
    (folder / "huge.y4m").write_bytes(header + bytes(4096))
    return {
        "zero.mp4": "empty",
        "truncated.mp4": "corrupt",
        "text.mp4": "not_media",
        "image.png": "still_image",
        "one_frame.mp4": "too_short",
        "static.mp4": "static",
        "huge.y4m": "oversized",
    }


def test_bad_inputs_each_rejected_with_its_reason(tmp_path, bikes_path, carphone_path):
    expected = _bad_inputs(tmp_path / "bad", bikes_path)
    assert len(set(expected.values())) == len(expected)  # one distinct reason per bad file
    cfg = _cfg(val_fraction=0.0)
    inputs = [str(bikes_path), str(carphone_path), str(tmp_path / "bad" / "*")]
    manifest = shard_videos(inputs, out=str(tmp_path / "out"), dataset="mixed", cfg=cfg)
    entries = {e["name"]: e for e in manifest["inputs"]}
    assert set(entries) == {*expected, "bikes.mp4", "carphone_pristine.mp4"}
    for name, reason in expected.items():
        entry = entries[name]
        assert (entry["status"], entry["reason"]) == ("rejected", reason), entry
        assert entry["detail"] and entry["clips"] == 0
    assert entries["huge.y4m"]["probe"]["width"] == 16000
    assert entries["huge.y4m"]["stats"]["decoded_frames"] == 0  # rejected before decoding
    for good in ("bikes.mp4", "carphone_pristine.mp4"):
        assert entries[good]["status"] == "accepted" and entries[good]["clips"] > 0
    counts = manifest["counts"]
    assert (counts["inputs"], counts["accepted"], counts["rejected"]) == (9, 2, 7)
    assert counts["rejected_by_reason"] == {r: 1 for r in expected.values()}
    samples = _check_dataset(join(str(tmp_path / "out"), "mixed"), manifest, cfg)
    assert {s["meta"]["name"] for s in samples.values()} == {"bikes.mp4", "carphone_pristine.mp4"}


def test_clips_show_the_source_at_their_start(tmp_path, carphone_path):
    """Each clip is the source resampled from ``json.start`` (checked against read_video)."""
    from mardini.video import read_video, to_uint8

    inp = list_inputs([str(carphone_path)])[0]
    result = process_video(inp, _cfg(size=256), str(tmp_path))
    assert result.entry["clips"] == len(result.clips) == 4
    for clip in result.clips:
        got = _decode(Path(clip.path).read_bytes()).astype(np.float64)
        start = clip.meta["start"]
        ref = to_uint8(read_video(carphone_path, frames=8, fps=8, size=256, start=start))
        psnr = 10 * np.log10(255**2 / ((got - ref) ** 2).mean())
        assert psnr > 29, (start, psnr)  # one tick (0.125 s) off scores 21-26 dB


def test_limits_are_checked_before_decoding(tmp_path, bikes_path):
    inp = list_inputs([str(bikes_path)])[0]
    for fields, reason, words in (
        ({"max_duration_s": 5.0}, "oversized", "max_duration_s=5"),
        ({"max_frames": 100}, "oversized", "250 frames"),
        ({"max_width": 320}, "oversized", "640x272"),
        ({"frames": 200}, "too_short", "shorter than one clip"),
    ):
        result = process_video(inp, _cfg(**fields), str(tmp_path))
        entry = result.entry
        assert (entry["status"], entry["reason"]) == ("rejected", reason), entry
        assert words in entry["detail"] and entry["stats"]["decoded_frames"] == 0
    assert not list(tmp_path.iterdir())  # nothing spooled


def test_vanished_input_is_unreadable(tmp_path):
    gone = InputFile(str(tmp_path / "gone.mp4"), "gone.mp4", 1234)  # listed, then deleted
    entry = process_video(gone, _cfg(), str(tmp_path)).entry
    assert (entry["status"], entry["reason"]) == ("rejected", "unreadable")
    assert "gone.mp4" in entry["detail"]


def _dies_on_crash_inputs(inp: InputFile, cfg: PrepConfig, spool: str, threads: int):
    """process_video, except that the process dies (as on an FFmpeg segfault) on crash*."""
    if inp.name.startswith("crash"):
        os._exit(11)
    return process_video(inp, cfg, spool, threads)


@pytest.mark.slow
def test_a_dying_worker_rejects_only_its_input(tmp_path, carphone_path):
    good = list_inputs([str(carphone_path)])[0]
    crash = InputFile(str(tmp_path / "crash.mp4"), "crash.mp4", 1)
    jobs = [(crash, str(tmp_path)), (good, str(tmp_path))]
    results = list(_results(jobs, _cfg(), workers=2, fn=_dies_on_crash_inputs))
    entries = [r.entry for r in results]
    assert [(e["name"], e["status"], e["reason"]) for e in entries] == [
        ("crash.mp4", "rejected", "crashed"),
        ("carphone_pristine.mp4", "accepted", None),
    ]
    assert entries[1]["clips"] == len(results[1].clips) == 4


# ----------------------------------------------------------------------------- chunks


def test_chunks_are_content_defined_and_stable():
    cfg = _cfg(chunk_inputs=4)
    files = [InputFile(f"/videos/{i:04d}.mp4", f"{i:04d}.mp4", 1000 + i) for i in range(200)]
    chunks = plan_chunks(files, cfg)
    assert [i for c in chunks for i in c.inputs] == sorted(files)  # each input once, in order
    assert plan_chunks(list(reversed(files)), cfg) == chunks  # order of discovery is irrelevant
    assert 20 < len(chunks) < 100  # about 200 / 4 chunks
    # Adding one video changes one or two chunks, not every chunk after it.
    added = plan_chunks([*files, InputFile("/videos/0100a.mp4", "0100a.mp4", 7)], cfg)
    assert len({c.key for c in added} - {c.key for c in chunks}) <= 2
    # Chunk keys follow the config: shards cut differently never share a name.
    assert not {c.key for c in plan_chunks(files, _cfg(chunk_inputs=4, crf=30))} & {
        c.key for c in chunks
    }


def test_data_does_not_depend_on_where_the_videos_lie(tmp_path):
    """Two clones of one project in different folders cut the same chunks, in the same order,
    with the same clip keys: only the inputs' relative names decide (the demo's training order
    and so its numbers used to depend on the clone's absolute path)."""
    cfg = _cfg(chunk_inputs=4)
    names = [f"{i:04d}.mp4" for i in range(60)]
    here = [InputFile(f"/home/a/project/videos/{n}", n, 1000 + i) for i, n in enumerate(names)]
    there = [InputFile(f"/tmp/xyz-clone/videos/{n}", n, 1000 + i) for i, n in enumerate(names)]
    cut_here, cut_there = plan_chunks(here, cfg), plan_chunks(there, cfg)
    assert [[i.name for i in c.inputs] for c in cut_here] == [
        [i.name for i in c.inputs] for c in cut_there
    ]
    # Chunk keys name the shards, and the loader reads shards in name order.
    assert [c.key for c in cut_here] == [c.key for c in cut_there]
    assert len(cut_here) > 3  # there are boundaries to get wrong
    assert [sample_key(i, 0) for i in here] == [sample_key(i, 0) for i in there]
    # Different videos that share a relative name are told apart (keys must stay unique).
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        (tmp_path / root / "clip.mp4").write_bytes(root.encode())
    found = list_inputs([str(tmp_path / "a"), str(tmp_path / "b")])
    assert len({i.name for i in found}) == 2
    assert len({sample_key(i, 0) for i in found}) == 2


# ----------------------------------------------------------------------------- reruns


@pytest.fixture(scope="module")
def many_inputs(tmp_path_factory, bikes_path, carphone_path) -> list[str]:
    """Six inputs (bikes, carphone and renamed copies), one chunk each: a multi-chunk run."""
    folder = tmp_path_factory.mktemp("many")
    for i in range(2):
        (folder / f"bikes{i}.mp4").symlink_to(bikes_path)
        (folder / f"carphone{i}.mp4").symlink_to(carphone_path)
    (folder / "bikes.mp4").symlink_to(bikes_path)
    (folder / "zero.mp4").write_bytes(b"")
    return [str(folder)]


MANY_CFG = {"chunk_inputs": 1, "val_fraction": 0.3}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, many_inputs) -> dict:
    """An uninterrupted run over ``many_inputs``: what every resumed run must end up equal to.

    It runs in a pool of two processes; the runs it is compared with run inline, so equality
    also shows that the worker count never changes what is written.
    """
    out = str(tmp_path_factory.mktemp("reference"))
    manifest = shard_videos(many_inputs, out=out, dataset="d", cfg=_cfg(**MANY_CFG, workers=2))
    url = join(out, "d")
    return {"url": url, "manifest": manifest, "clips": _clip_hashes(url), "files": _listing(url)}


def test_rerun_is_idempotent(tmp_path, many_inputs, reference):
    assert reference["manifest"]["counts"]["shards"] >= 5
    assert len(reference["manifest"]["chunks"]) == 6
    out = str(tmp_path)
    first = shard_videos(many_inputs, out=out, dataset="d", cfg=_cfg(**MANY_CFG))
    seen: list[bool] = []
    second = shard_videos(
        many_inputs,
        out=out,
        dataset="d",
        cfg=_cfg(**MANY_CFG, workers=2),
        on_input=lambda entry, resumed: seen.append(resumed),
    )
    assert seen == [True] * 6  # nothing was decoded again
    assert _without_time(second) == _without_time(first) == _without_time(reference["manifest"])
    assert _listing(join(out, "d")) == reference["files"]
    assert _clip_hashes(join(out, "d")) == reference["clips"]


def test_shards_stream_into_training_batches(reference):
    from mardini.data import train_batches

    keys = set(reference["clips"])
    batch = next(
        iter(train_batches(reference["url"], frames=8, resolution=32, fps=8, micro_batch=2))
    )
    assert tuple(batch.video.shape) == (2, 8, 3, 32, 32)
    assert set(batch.keys) <= keys


def test_changed_config_is_refused(tmp_path, carphone_path):
    out = str(tmp_path)
    shard_videos([str(carphone_path)], out=out, dataset="d", cfg=_cfg())
    with pytest.raises(PrepError, match=r"fps: 8\.0 -> 4\.0.*--overwrite"):
        shard_videos([str(carphone_path)], out=out, dataset="d", cfg=_cfg(fps=4.0))
    manifest = shard_videos(
        [str(carphone_path)], out=out, dataset="d", cfg=_cfg(fps=4.0), overwrite=True
    )
    assert manifest["config"]["fps"] == 4.0 and manifest["counts"]["clips"] == 2


def test_interrupted_run_resumes_to_the_same_clips(tmp_path, many_inputs, reference):
    out, url = str(tmp_path), join(str(tmp_path), "d")
    calls = []

    def interrupt(entry: dict, resumed: bool) -> None:
        calls.append(entry["name"])
        if len(calls) == 3:  # Ctrl-C while the third chunk is being written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shard_videos(many_inputs, out=out, dataset="d", cfg=_cfg(**MANY_CFG), on_input=interrupt)
    files = _listing(url)
    assert "manifest.json" not in files
    assert len([f for f in files if f.startswith("chunks/")]) == 2
    assert not [f for f in files if "/." in f or f.startswith(".")]  # staging files cleaned up
    shard_videos(many_inputs, out=out, dataset="d", cfg=_cfg(**MANY_CFG))
    assert _clip_hashes(url) == reference["clips"]
    assert _listing(url) == reference["files"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_clips(tmp_path, many_inputs, reference):
    out, url = str(tmp_path), join(str(tmp_path), "d")
    command = [sys.executable, "-m", "data_prep", "shard", *many_inputs, "--out", out]
    command += ["--dataset", "d", "--chunk-inputs", "1", "--val-fraction", "0.3", "-j", "1"]
    command += [f"--{k}={v}" for k, v in SMALL.items()]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks_dir = Path(url) / "chunks"
    deadline = time.time() + 120
    while not (chunks_dir.is_dir() and list(chunks_dir.glob("[!.]*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no chunk was committed in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no cleanup handler runs
    proc.wait()
    files = _listing(url)
    assert "manifest.json" not in files, "the run finished before it could be killed"
    assert len([f for f in files if f.startswith("chunks/") and f.endswith(".json")]) < 6
    for name in files:  # every visible shard is whole: it reads to its end
        if name.endswith(".tar") and "/shard-" in name:
            with tarfile.open(Path(url) / name) as tar:
                assert len(tar.getmembers()) % 2 == 0
    shard_videos(many_inputs, out=out, dataset="d", cfg=_cfg(**MANY_CFG))
    assert _clip_hashes(url) == reference["clips"]
    assert _listing(url) == reference["files"]


# ----------------------------------------------------------------------------- CLI


def test_cli_shard_and_show(tmp_path, carphone_path, bikes_path):
    runner = CliRunner()
    bad = tmp_path / "text.mp4"
    bad.write_text("not a video")
    args = ["shard", str(carphone_path), str(bad), "--out", str(tmp_path / "out")]
    args += ["--dataset", "cli", "--fps", "8", "--frames", "8", "--size", "32", "-j", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 inputs = 1 accepted + 1 rejected" in result.output
    assert "not_media" in result.output
    manifest = json.loads((tmp_path / "out" / "cli" / "manifest.json").read_text())
    assert manifest["counts"]["clips"] == 4
    shown = runner.invoke(app, ["show", str(tmp_path / "out" / "cli")])
    assert shown.exit_code == 0 and "text.mp4" in shown.output and "not_media" in shown.output
    changed = runner.invoke(app, [*args, "--size", "64"])
    assert changed.exit_code == 2 and "--overwrite" in changed.output
    typo = runner.invoke(app, ["shard", str(tmp_path / "nope.mp4"), "--out", str(tmp_path)])
    assert typo.exit_code == 2 and "nope.mp4" in typo.output
    assert os.path.exists(tmp_path / "out" / "cli" / "prep_config.json")
