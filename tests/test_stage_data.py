"""A stage's data: its own dataset, refused when its clips are smaller than the stage trains
at, and the shared memory its loaders need, checked before anything is built."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
import yaml
from typer.testing import CliRunner

from mardini.config import load_config
from mardini.data.loader import SharedMemoryError, sample_bytes
from mardini.data.shards import MANIFEST, clip_size
from mardini.layout import shards_url
from mardini.storage import join
from mardini.train.engine import (
    DatasetResolutionError,
    check_loader_memory,
    check_resolution,
)
from pipelines.cli import app  # the `mardini` command: `prep` is registered there
from tests.conftest import CONFIGS


def _prep(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["prep", "shard", *args, "--workers", "1"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory, carphone_path) -> dict:
    """A store whose dataset ``clips`` was cut by ``mardini prep shard`` at 32 px from a real
    clip (``videos/`` holds it, named so that its clips fall in train)."""
    root = tmp_path_factory.mktemp("stage-data")
    videos = root / "videos"
    videos.mkdir()
    shutil.copy(carphone_path, videos / "carphone_pristine.mp4")
    out = join(str(root / "store"), "shards")
    _prep([str(videos), "--size", "32", "--frames", "8", "--out", out, "--dataset", "clips"])
    return {"store": str(root / "store"), "videos": str(videos), "out": out}


def _curriculum(tmp_path: Path, resolution: int, **stage) -> Path:
    """tiny.yaml's curriculum on the ``clips`` dataset with its ``mar`` stage at ``resolution``."""
    raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    raw["name"] = "stage-data"
    raw["model"] = {"preset": "debug"}
    raw["data"] = {"dataset": "clips", "shuffle_buffer": 4}
    raw["stages"] = [{**raw["stages"][0], "resolution": resolution, "frames": 4, **stage}]
    path = tmp_path / "stage-data.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_stage_reads_its_own_dataset_else_the_curriculums(tmp_path):
    cfg = load_config(_curriculum(tmp_path, 32))
    stage = cfg.stages[0]
    assert stage.dataset is None
    assert shards_url(cfg, "s3://b/store", stage) == "s3://b/store/shards/clips"
    named = stage.model_copy(update={"dataset": "clips-512"})
    assert shards_url(cfg, "s3://b/store", named) == "s3://b/store/shards/clips-512"
    url = stage.model_copy(update={"dataset": "s3://other/shards/clips-1024"})
    assert shards_url(cfg, "s3://b/store", url) == "s3://other/shards/clips-1024"
    # data.shards points the curriculum's dataset elsewhere; a stage's own still wins.
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shards": "/data/x"})})
    assert shards_url(moved, "s3://b/store", stage) == "/data/x"
    assert shards_url(moved, "s3://b/store", named) == "s3://b/store/shards/clips-512"
    # Every shipped curriculum loads unchanged: no stage names a dataset of its own.
    for name in ("tiny.yaml", "small.yaml"):
        assert all(s.dataset is None for s in load_config(CONFIGS / name).stages)


def test_clip_size_comes_from_the_manifest_else_from_a_sample(store, train_shards, tmp_path):
    url = join(store["out"], "clips")
    assert clip_size(url, "train") == (32, join(url, MANIFEST))
    # Shards written by hand (no manifest): the first sample's json ...
    size, where = clip_size(train_shards, "train")
    assert size == 32 and re.search(r"train/shard-000000\.tar#\S+$", where), where
    # ... and when its json has no size either, its video stream.
    (tmp_path / "train").mkdir()
    first = next(iter(wds.WebDataset(f"{train_shards}/train/shard-000000.tar", shardshuffle=False)))
    with wds.TarWriter(str(tmp_path / "train" / "shard-000000.tar")) as tar:
        tar.write({"__key__": "a", "mp4": first["mp4"], "json": {"fps": 8, "frames": 8}})
    assert clip_size(str(tmp_path), "train")[0] == 32


def test_a_stage_refuses_clips_smaller_than_it_trains_at(store, tmp_path):
    """Cut at 32 px, asked for 64: refused with the dataset, both sizes and the command that
    cuts one at 64 px; running that command gives a dataset the stage accepts."""
    cfg = load_config(_curriculum(tmp_path, 64))
    with pytest.raises(DatasetResolutionError) as err:
        check_resolution(cfg, cfg.stages[0], store["store"])
    message = str(err.value)
    url = join(store["out"], "clips")
    assert f"stage 'mar' trains at 64 px but its dataset {url} holds 32 px clips" in message
    assert "upscaled" in message
    command = re.search(r"`(mardini prep shard [^`]+)`", message).group(1)
    assert command == (
        f"mardini prep shard <videos> --size 64 --fps 8 --frames 8 --out {store['out']} "
        "--dataset clips-64"
    )
    assert message.endswith("then set stages.mar.dataset: clips-64")
    args = [store["videos"] if a == "<videos>" else a for a in shlex.split(command)[3:]]
    _prep(args)
    cfg = load_config(_curriculum(tmp_path, 64, dataset="clips-64"))
    assert check_resolution(cfg, cfg.stages[0], store["store"]) == 64
    # Larger clips are fine (the loader downscales them), and so are equal ones.
    for resolution in (16, 32):
        cfg = load_config(_curriculum(tmp_path, resolution))
        assert check_resolution(cfg, cfg.stages[0], store["store"]) == 32
    # A stage already naming a dataset at the wrong size is told to cut it again.
    cfg = load_config(_curriculum(tmp_path, 128, dataset="clips-64"))
    with pytest.raises(DatasetResolutionError, match="--dataset clips-128`"):
        check_resolution(cfg, cfg.stages[0], store["store"])


@pytest.mark.slow
def test_the_refusal_comes_before_the_stage_builds_anything(store, tmp_path):
    config = _curriculum(tmp_path, 64)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            "-m",
            "mardini.train",
            "--config",
            str(config),
            "--stage",
            "mar",
            "--store",
            store["store"],
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode != 0
    assert "DatasetResolutionError" in result.stderr and "--dataset clips-64" in result.stderr
    assert not Path(store["store"], "runs").exists()  # no checkpoint, no MLflow run


def test_a_stage_refuses_loaders_that_do_not_fit_dev_shm(store, tmp_path, monkeypatch):
    """The stage's budget, from its real first sample (uint8 frames at the clips' 32 px), on
    the real ``/dev/shm`` of this machine: set just over its free space, the stage refuses."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    cfg = load_config(_curriculum(tmp_path, 16, micro_batch=2))
    stage = cfg.stages[0]
    per_sample = sample_bytes(
        join(store["out"], "clips"), "train", frames=4, resolution=16, fps=stage.fps
    )
    assert per_sample == 4 * 3 * 32 * 32  # the clips' own size, uint8, not the stage's floats
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg.data.workers, cfg.data.prefetch = 2, 2
    assert check_loader_memory(cfg, stage, store["store"]) == 2 * (2 * 2 + 1) * 2 * per_sample
    stat = os.statvfs("/dev/shm")
    free = stat.f_bavail * stat.f_frsize
    cfg.data.prefetch = free // (2 * 2 * 2 * per_sample) + 1
    with pytest.raises(SharedMemoryError, match=r"2 rank\(s\) x \(2 workers x prefetch"):
        check_loader_memory(cfg, stage, store["store"])
    cfg.data.workers = 0  # the main process decodes: no shared memory at all
    assert check_loader_memory(cfg, stage, store["store"]) == 0
