"""The Prefect flow ``shard-videos`` on a real (temporary) Prefect server: same result as the CLI."""

from __future__ import annotations

import json

import pytest

from data_prep import PrepConfig, shard_videos
from mardini.storage import filesystem, join

CONFIG = {"fps": 8.0, "frames": 8, "size": 32, "chunk_inputs": 1, "val_fraction": 0.5}


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect API (SQLite) for every flow run in this module."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as patch:
        # The server's telemetry heartbeat races the harness for the SQLite lock: noise only.
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, bikes_path, carphone_path) -> list[str]:
    broken = tmp_path_factory.mktemp("inputs") / "broken.mp4"
    broken.write_text("not a video")
    return [str(bikes_path), str(carphone_path), str(broken)]


@pytest.fixture(scope="module")
def cli_manifest(tmp_path_factory, inputs) -> dict:
    """The manifest the CLI path (``shard_videos``) writes for ``inputs``."""
    out = str(tmp_path_factory.mktemp("cli"))
    return shard_videos(inputs, out=out, dataset="d", cfg=PrepConfig(**CONFIG))


def _manifest(url: str) -> dict:
    fs, path = filesystem(join(url, "manifest.json"))
    return json.loads(fs.cat_file(path))


def _comparable(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("counts", "splits", "inputs", "fingerprint", "config")}


def _same_as_cli(url: str, cli: dict) -> None:
    manifest = _manifest(url)
    assert _comparable(manifest) == _comparable(cli)
    # Same shards, same bytes: the flow and the CLI run one implementation.
    assert [(s["path"], s["sha256"]) for s in manifest["shards"]] == [
        (s["path"], s["sha256"]) for s in cli["shards"]
    ]


@pytest.mark.slow
def test_flow_on_threads_matches_cli(prefect_server, s3_bucket, inputs, cli_manifest):
    from pipelines.shard_flow import shard_videos_flow

    out = join(s3_bucket, "shards")
    result = shard_videos_flow(inputs, out=out, dataset="d", config=CONFIG, max_workers=2)
    assert result["counts"] == cli_manifest["counts"]
    assert result["counts"]["inputs"] == 3 == result["counts"]["accepted"] + 1
    assert len(cli_manifest["chunks"]) == 3 and result["counts"]["clips"] >= 10
    _same_as_cli(join(out, "d"), cli_manifest)
    # A second flow run finds every chunk committed and changes nothing.
    again = shard_videos_flow(inputs, out=out, dataset="d", config=CONFIG)
    assert again["counts"] == result["counts"]
    _same_as_cli(join(out, "d"), cli_manifest)


@pytest.mark.slow
def test_flow_on_dask_matches_cli(prefect_server, tmp_path, inputs, cli_manifest):
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster

    from pipelines.shard_flow import shard_videos_flow

    # The cluster path: the flow connects to a running Dask scheduler by address. (An
    # in-process cluster keeps the test fast; a real one differs only in where workers run.)
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=2) as cluster:
        result = shard_videos_flow(
            inputs,
            out=str(tmp_path),
            dataset="d",
            config=CONFIG,
            runner="dask",
            dask_address=cluster.scheduler_address,
        )
    assert result["counts"] == cli_manifest["counts"]
    _same_as_cli(join(str(tmp_path), "d"), cli_manifest)


def test_unknown_runner_is_an_error():
    from data_prep import PrepError
    from pipelines.shard_flow import make_task_runner

    with pytest.raises(PrepError, match="threads, processes or dask"):
        make_task_runner("mpi")  # type: ignore[arg-type]
