"""Serve the local deployments against the Prefect API in ``PREFECT_API_URL`` (``make serve``).

``prefect deployment run train-curriculum/local`` (and ``shard-videos/local``) then runs the
flow in this process's machine, with the embedded defaults (local store, SQLite MLflow).
"""

from __future__ import annotations

from prefect import serve

from pipelines.curriculum_flow import evaluate_checkpoint, promote_checkpoint, train_curriculum
from pipelines.shard_flow import shard_videos_flow


def deployments() -> list:
    """The deployments this machine serves."""
    return [
        train_curriculum.to_deployment(
            name="local", parameters={"config": "configs/tiny.yaml", "launcher": "local"}
        ),
        shard_videos_flow.to_deployment(name="local"),
        evaluate_checkpoint.to_deployment(name="local"),
        promote_checkpoint.to_deployment(name="local"),
    ]


if __name__ == "__main__":
    serve(*deployments())
