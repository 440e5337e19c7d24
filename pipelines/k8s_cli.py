"""``mardini k8s``: render the Kubernetes objects the platform submits, without a cluster."""

from __future__ import annotations

import os
from pathlib import Path

import typer

app = typer.Typer(
    help="Kubernetes helpers (no cluster needed): render the PyTorchJob of a stage.",
    no_args_is_help=True,
)


@app.callback()
def main() -> None:
    """Kubernetes helpers."""


@app.command("render-job")
def render_job(
    config: Path = typer.Option(..., "--config", "-c", help="Curriculum YAML (read here)."),
    stage: str = typer.Option(..., "--stage", "-s", help="Stage to train."),
    image: str | None = typer.Option(None, help="Training image, pinned by tag or digest."),
    nnodes: int | None = typer.Option(None, min=1, help="Pods (elastic Workers)."),
    nproc_per_node: int | None = typer.Option(None, min=1, help="Ranks per pod (default: GPUs)."),
    gpus_per_node: int | None = typer.Option(None, min=0, help="GPUs per pod; 0 trains on CPU."),
    cpu: str | None = typer.Option(None, help="CPU request and limit per pod."),
    memory: str | None = typer.Option(None, help="Memory request and limit per pod."),
    shm_size: str | None = typer.Option(None, help="Size of the in-memory /dev/shm."),
    max_restarts: int | None = typer.Option(
        None, min=0, help="Restarts of all ranks from the latest checkpoint after one fails."
    ),
    namespace: str | None = typer.Option(None, help="Namespace of the job."),
    store: str | None = typer.Option(
        None, help="MARDINI_STORE for the job (default: the ConfigMap's)."
    ),
    run_id: str | None = typer.Option(
        None, help="MLflow run to tie the job to (label mardini.io/mlflow-run-id)."
    ),
    name: str | None = typer.Option(None, help="Job name (default: CURRICULUM-STAGE)."),
    config_path: str | None = typer.Option(
        None, help="Config path inside the image (default: --config relative to the checkout)."
    ),
) -> None:
    """Print the PyTorchJob YAML that trains STAGE of CONFIG (defaults from MARDINI_K8S_*)."""
    from mardini.config import ConfigError, load_config
    from pipelines.launchers.pytorchjob import (
        LaunchConfig,
        build_pytorchjob,
        image_config_path,
        to_yaml,
    )

    try:
        cfg = load_config(config)
        launch = LaunchConfig.from_env(
            os.environ,
            image=image,
            nnodes=nnodes,
            nproc_per_node=nproc_per_node,
            gpus_per_node=gpus_per_node,
            cpu=cpu,
            memory=memory,
            shm_size=shm_size,
            max_restarts=max_restarts,
            namespace=namespace,
            store=store,
        )
        job = build_pytorchjob(
            cfg,
            stage,
            run_id=run_id,
            name=name,
            config_path=config_path or image_config_path(config),
            launch=launch,
        )
    except (ConfigError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(to_yaml(job), nl=False)


if __name__ == "__main__":
    app()
