"""``python -m mardini.train --config C --stage S [--override k=v ...]``, under torchrun."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


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
    # torch.distributed's deprecation notices, once per rank and step, bury the training log.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
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
        _leave_process_group()  # every rank stopped together: no collective is in flight
        print(str(err), file=sys.stderr)
        return STOPPED_EXIT
    _leave_process_group()
    if rank == "0":
        print(f"stage {result.stage} done: {result.final_url} (MLflow run {result.run_id})")
    return 0


def _leave_process_group() -> None:
    """Destroy the process group after the last collective, rather than leaving its backend's
    threads to interpreter shutdown (PyTorch's documented practice; see ``_exit`` for the abort
    that made this matter). Only on the paths where every rank is done (as torchtitan does):
    after an exception a peer may still be in a collective, and destroying would hang there."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _exit(code: int) -> None:
    """Leave without running C++ static destructors. Even after ``destroy_process_group`` a
    rank was seen to abort at interpreter teardown ("terminate called without an active
    exception", exit -6, about 1 run in 20 on a loaded 2-core machine, no Python frame left:
    a C++ thread still joinable at teardown, whose library was not identified), failing a stage
    whose export was already written. Everything the job writes is closed by
    now (the tracker joined its thread, the export and checkpoints are committed), so flushing
    our own streams is all that teardown still owed us."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
