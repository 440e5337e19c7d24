"""A stage's evaluation as a job of its own: ``python -m mardini.eval.job``.

The flow that trains a curriculum does no heavy work: on a cluster the flow-run pod has no GPU
and little memory, and loading a paper-scale export there (14.4 GB of fp32 weights) would be
killed. So the evaluation of a stage runs where the GPUs are, as a job from the training image
(``pipelines.launchers.eval_job``), and locally as a subprocess running the same command.

The job loads the stage's export, evaluates it on the held-out split (``evaluate_final``: the
stage's frames, resolution and fps, the curriculum's sampling settings), logs metrics, the
per-frame table and the sample grids to the stage's MLflow run, and writes ``eval.json`` and
``samples/`` to ``--out`` in the store, ``eval.json`` last: its presence marks a finished
evaluation. The flow reads it back with ``read_results`` and applies the gates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from mardini.storage import filesystem, join, retry

log = logging.getLogger(__name__)

RESULTS = "eval.json"


def eval_key(export_meta: dict[str, Any], settings: dict[str, Any], data: str) -> str:
    """What an evaluation's results depend on, hashed: the export's weights (their digest, or
    its whole metadata for an export written before digests), the settings and the data."""
    weights = export_meta.get("weights_sha256") or json.dumps(export_meta, sort_keys=True)
    what = json.dumps({"weights": weights, "settings": settings, "data": data}, sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def eval_dir(stage_url: str, key: str) -> str:
    """Where one evaluation of a stage writes its outputs: ``{stage_dir}/eval/{key}``; a second
    evaluation of the same export with the same settings finds them there (and is not run)."""
    return join(stage_url, "eval", key)


def upload_outputs(local: Path, out_url: str) -> None:
    """Copy ``local``'s samples then its ``eval.json`` to ``out_url`` (results last)."""
    fs, path = filesystem(out_url)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != RESULTS)
    for file in [*files, local / RESULTS]:
        target = f"{path}/{file.relative_to(local).as_posix()}"
        retry(lambda f=file, t=target: fs.put_file(str(f), t), f"writing {out_url}")


def read_results(out_url: str) -> dict[str, Any] | None:
    """The results (metrics, and reasons for what was not computed) a finished evaluation
    wrote to ``out_url``, or None when there are none."""
    fs, path = filesystem(out_url)
    try:
        raw = json.loads(retry(lambda: fs.cat_file(f"{path}/{RESULTS}"), f"reading {out_url}"))
    except FileNotFoundError:
        return None
    decoded = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
    # eval.json writes non-finite numbers as these strings; a reason is never one of them.
    return {k: decoded.get(v, v) if isinstance(v, str) else v for k, v in raw["results"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mardini.eval.job", description=__doc__)
    parser.add_argument("--config", required=True, help="the curriculum YAML")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--export", required=True, help="the stage's final/ URL")
    parser.add_argument("--out", required=True, help="store URL for eval.json and samples/")
    parser.add_argument("--data", default=None, help="held-out shards (default: the config's)")
    parser.add_argument("--store", default=None)
    parser.add_argument("--run-id", default=None, help="the stage's MLflow run")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import torch

    from mardini.config import load_config
    from mardini.eval.evaluate import evaluate_final

    cfg = load_config(args.config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        results = evaluate_final(
            args.export,
            cfg,
            args.stage,
            data=args.data,
            run_id=args.run_id,
            store=args.store,
            out_dir=tmp,
            tracking_uri=args.tracking_uri,
            device=device,
        )
        upload_outputs(Path(tmp), args.out)
    log.info("evaluated %s on %s: %d results in %s", args.stage, device, len(results), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
