"""Learning benchmark: what a stage's model is worth after N training steps, on held-out clips.

For each variant (the config as written, or with overrides) and each step count, trains the
stage from its start in one plain-PyTorch process (the trainer's model, loss, masks, loader,
augmentation, optimizer and warm-up + cosine schedule, stretched to that many steps; the batch
is ``micro_batch x grad_accum x --ranks`` clips, the batch of a ``--ranks``-rank job), then
evaluates on the held-out split exactly as ``mardini eval`` does. Printed per row: interpolation
and image-to-video PSNR of the sampled frames and of the one-call x0 estimate, SSIM, the
nearest-frame and linear-blend baselines on the same clips and the differences to them (dB),
training seconds and steps/s. ``--sample-steps 1,5,25`` evaluates each trained model at those
sampler step counts (one row each; default: the config's ``sample.steps``). The rows of one run
are measured side by side on one machine.

Before the stage itself, the stages it starts from (``init_from``) are trained the same way at
their configured steps, once per variant (``--from-scratch`` skips them).

    .venv/bin/python bench/quality.py --config configs/tiny.yaml --stage joint-interpolation \\
        --steps 100,200,400 [--variant paper:model.prediction=velocity,...] [--from-scratch]

The dataset is the config's (``{store}/shards/{data.dataset}`` unless ``data.shards`` is set):
``mardini demo`` (or ``mardini prep demo-data``) writes the demo's.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch

from mardini.config import load_config
from mardini.storage import store_root
from mardini.train.inprocess import evaluate_held_out, start_from, train_in_process

# (metric, width, format); a bar separates the setting, interpolation and image-to-video groups.
COLUMNS = (
    ("variant", 14, "<"),
    ("steps", 5, "d"),
    ("sampler_steps", 4, "d"),
    ("train_s", 7, ".1f"),
    ("steps_per_s", 5, ".2f"),
    ("|", 1, ""),
    ("interp_psnr", 6, ".2f"),
    ("interp_x0_psnr", 6, ".2f"),
    ("baseline_nearest_interp_psnr", 7, ".2f"),
    ("baseline_blend_interp_psnr", 6, ".2f"),
    ("vs_nearest", 6, "+.2f"),
    ("vs_blend", 6, "+.2f"),
    ("interp_ssim", 6, ".3f"),
    ("baseline_nearest_interp_ssim", 7, ".3f"),
    ("|", 1, ""),
    ("i2v_psnr", 6, ".2f"),
    ("i2v_x0_psnr", 6, ".2f"),
    ("baseline_nearest_i2v_psnr", 7, ".2f"),
    ("i2v_vs_nearest", 6, "+.2f"),
)
HEADER = (
    "variant        steps samp train_s  st/s | interp  x0est nearest  blend  -near -blend   ssim "
    "nearest | i2v    x0est nearest  -near"
)


def row(values: dict) -> str:
    """One table line; a missing value prints as '-'."""
    cells = []
    for name, width, spec in COLUMNS:
        value = values.get(name)
        if name == "|":
            cells.append("|")
        elif value is None:
            cells.append("-".rjust(width))
        elif spec == "<":
            cells.append(f"{value:<{width}}")
        else:
            sign = "+" if spec.startswith("+") else ""
            cells.append(f"{value:>{sign}{width}{spec.lstrip('+')}}")
    return " ".join(cells)


def differences(metrics: dict) -> dict:
    """The model's PSNR minus each baseline's, per task (dB), where both were measured."""
    out = {}
    for task, prefix in (("interp", ""), ("i2v", "i2v_")):
        model_psnr = metrics.get(f"{task}_psnr")
        for base in ("nearest", "blend"):
            ref = metrics.get(f"baseline_{base}_{task}_psnr")
            if model_psnr is not None and ref is not None:
                out[f"{prefix}vs_{base}"] = model_psnr - ref
    return out


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name:key=value,key=value`` -> (name, overrides); ``name`` alone -> no overrides."""
    name, _, rest = text.partition(":")
    return name, [o for o in rest.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--stage", default=None, help="default: the config's last stage")
    parser.add_argument("--steps", default="100,200,400", help="comma-separated step counts")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="name:key=value,... config overrides (repeatable); default: the config as written",
    )
    parser.add_argument("--set", action="append", default=[], help="override for every variant")
    parser.add_argument("--store", default=None, help="default: $MARDINI_STORE or ./.mardini")
    parser.add_argument("--ranks", type=int, default=2, help="batch = micro_batch x this")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips evaluated")
    parser.add_argument("--from-scratch", action="store_true", help="skip init_from stages")
    parser.add_argument(
        "--sample-steps",
        default=None,
        help="comma-separated sampler step counts to evaluate each trained model at "
        "(default: the config's sample.steps)",
    )
    parser.add_argument("--json", default=None, help="append every row as JSON to this file")
    parser.add_argument(
        "--save", default=None, help="write each trained model's weights to DIR/VARIANT-STEPS.pt"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    store = store_root(args.store)
    counts = [int(s) for s in args.steps.split(",") if s]
    sample_counts = [int(s) for s in (args.sample_steps or "").split(",") if s]
    variants = [parse_variant(v) for v in args.variant] or [("config", [])]
    print(f"{args.config}, held-out split, {torch.get_num_threads()} threads")
    print(HEADER, flush=True)
    for name, overrides in variants:
        cfg = load_config(args.config, [*args.set, *overrides])
        stage = cfg.stage(args.stage or cfg.stages[-1].name)
        if stage.kind in ("mar", "autoencoder"):
            raise SystemExit(f"{stage.name} is a {stage.kind} stage: nothing to sample from")

        def announce(name: str, steps: int, stage=stage) -> None:
            print(f"  training {name} ({steps} steps) to start {stage.name} from", flush=True)

        init = None
        if not args.from_scratch:
            init = start_from(cfg, stage, store, args.ranks, {}, announce)
        for count in counts:
            trained = train_in_process(cfg, stage, store, count, args.ranks, init)
            for sampler_steps in sample_counts or [cfg.sample.steps]:
                sampled = cfg.model_copy(
                    update={"sample": cfg.sample.model_copy(update={"steps": sampler_steps})}
                )
                metrics = evaluate_held_out(sampled, stage, trained.model, store, args.clips)
                values = {
                    "variant": name[:14],
                    "steps": count,
                    "sampler_steps": sampler_steps,
                    "train_s": trained.seconds,
                    "steps_per_s": count / trained.seconds,
                    **metrics,
                    **differences(metrics),
                }
                print(row(values), flush=True)
                if args.json:
                    with open(args.json, "a") as out:
                        record = {"overrides": overrides, "stage": stage.name, **values}
                        out.write(json.dumps(record) + "\n")
            if args.save:
                os.makedirs(args.save, exist_ok=True)
                torch.save(trained.model.state_dict(), f"{args.save}/{name}-{count}.pt")


if __name__ == "__main__":
    main()
