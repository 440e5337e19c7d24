"""Prefect flow ``shard-videos``: list inputs, map ``shard_chunk`` over chunks, merge manifests.

The work is ``data_prep``'s (the same code the CLI runs); this module only orchestrates it. A
chunk is idempotent (it is skipped once its marker exists and redone whole otherwise), so a task
retry or a rerun of the whole flow never duplicates a clip.

Task runner (flow parameter ``runner``): ``threads`` (default; decoding releases the GIL),
``processes`` (Prefect's ProcessPoolTaskRunner), or ``dask`` (prefect-dask's DaskTaskRunner:
a local cluster, or an existing one at ``dask_address``). On a cluster every worker must reach
the inputs and ``out``: give ``s3://`` URLs, not local paths. Each task spools clips to its own
local temp directory and publishes whole shards, so workers share nothing but the store.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from data_prep.config import PrepConfig, PrepError
from data_prep.inputs import InputFile, list_inputs
from data_prep.sharding import (
    Chunk,
    claim_dataset,
    dataset_url,
    default_out,
    finish_dataset,
    plan_chunks,
    process_chunk,
)

RunnerKind = Literal["threads", "processes", "dask"]


def make_task_runner(
    kind: RunnerKind, max_workers: int | None = None, dask_address: str | None = None
) -> TaskRunner:
    """The task runner for ``kind``; ``dask`` needs the ``prefect-dask`` package."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=max_workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise PrepError(
                "runner 'dask' needs the prefect-dask package: pip install prefect-dask"
            ) from err
        if dask_address:
            return DaskTaskRunner(address=dask_address)
        cluster_kwargs: dict[str, Any] = {"threads_per_worker": 1}
        if max_workers:
            cluster_kwargs["n_workers"] = max_workers
        return DaskTaskRunner(cluster_kwargs=cluster_kwargs)
    raise PrepError(f"unknown task runner {kind!r}: choose threads, processes or dask")


@task(name="list-videos", cache_policy=NO_CACHE)
def list_videos(inputs: list[str]) -> list[InputFile]:
    """Expand paths, globs, directories and URLs into sorted unique input files."""
    return list_inputs(inputs)


@task(name="shard_chunk", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def shard_chunk(chunk: Chunk, cfg: PrepConfig, url: str, workers: int = 1) -> dict[str, Any]:
    """Decode, clip and shard one chunk of inputs (skipped if already committed)."""
    marker = process_chunk(chunk, cfg, url, workers=workers)
    clips = sum(s["clips"] for s in marker["shards"])
    get_run_logger().info("chunk %s: %d inputs, %d clips", chunk.key, len(chunk.inputs), clips)
    return marker


@task(name="merge-manifests", cache_policy=NO_CACHE)
def merge_manifests(
    url: str, dataset: str, cfg: PrepConfig, markers: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write the dataset manifest from the chunk markers (and drop stale shards)."""
    return finish_dataset(url, dataset, cfg, markers)


@flow(name="shard-videos")
def shard_videos_flow(
    inputs: list[str],
    out: str | None = None,
    dataset: str = "default",
    config: dict[str, Any] | None = None,
    runner: RunnerKind = "threads",
    max_workers: int | None = None,
    dask_address: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Shard videos to ``{out}/{dataset}``: one ``shard_chunk`` task per chunk, then merge."""
    logger = get_run_logger()
    cfg = PrepConfig.model_validate(config or {})
    url = dataset_url(out or default_out(), dataset)
    files = list_videos(inputs)
    chunks = plan_chunks(files, cfg)
    logger.info("%d inputs in %d chunks -> %s (%s runner)", len(files), len(chunks), url, runner)
    claim_dataset(url, cfg, overwrite=overwrite)
    with make_task_runner(runner, max_workers, dask_address) as task_runner:
        futures = [
            task_runner.submit(shard_chunk, parameters={"chunk": c, "cfg": cfg, "url": url})
            for c in chunks
        ]
        markers = [future.result() for future in futures]
    manifest = merge_manifests(url, dataset, cfg, markers)
    return {"url": url, "counts": manifest["counts"], "splits": manifest["splits"]}
