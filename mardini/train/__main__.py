"""``python -m mardini.train --config C --stage S [--override k=v ...]``, under torchrun."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train the stage, exit non-zero with a clear message on failure."""
    parser = argparse.ArgumentParser(prog="python -m mardini.train", description=__doc__)
    parser.add_argument("--config", required=True, help="curriculum YAML, e.g. configs/tiny.yaml")
    parser.add_argument("--stage", required=True, help="stage name in the curriculum")
    parser.add_argument("--override", "-o", action="append", default=[], help="dotted key=value")
    parser.add_argument(
        "--store", default=None, help="fsspec root (default $MARDINI_STORE or ./.mardini)"
    )
    parser.add_argument("--parent-run-id", default=None, help="MLflow run to nest this stage under")
    args = parser.parse_args(argv)

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    from mardini.config import ConfigError, load_config
    from mardini.train.engine import STOPPED_EXIT, Stopped, train_stage

    try:
        cfg = load_config(args.config, args.override)
        result = train_stage(
            cfg, args.stage, args.store, args.parent_run_id, config_path=args.config
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as err:  # the checkpoint is written: a restart resumes from it
        print(str(err), file=sys.stderr)
        return STOPPED_EXIT
    if rank == "0":
        print(f"stage {result.stage} done: {result.final_url} (MLflow run {result.run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
