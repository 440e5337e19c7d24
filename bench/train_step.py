"""Training-step throughput per stage kind: DeepSpeed ZeRO-3 vs a plain PyTorch step.

Same model, same batch, same machine, measured side by side in one run. On CPU the ratio is
ZeRO-3's overhead (partition gather/scatter hooks; there is nothing to shard across one
process); on a GPU the script also prints achieved TFLOP/s when a FLOP count is available.

    DS_ACCELERATOR=cpu .venv/bin/python bench/train_step.py [--preset tiny] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch

from mardini.config import ModelConfig, StageConfig
from mardini.masking import MaskSampler
from mardini.models import build_model
from mardini.train.engine import deepspeed_config, freeze_for, step_generator, tokens_per_sample


def _batch(frames: int, size: int, micro_batch: int) -> torch.Tensor:
    return (
        torch.rand(micro_batch, frames, 3, size, size, generator=torch.Generator().manual_seed(0))
        * 2
        - 1
    )


def _time_steps(step, steps: int, warmup: int = 2) -> float:
    """Seconds per step after ``warmup`` untimed steps."""
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    return (time.perf_counter() - start) / steps


def bench_kind(
    preset: str, kind: str, frames: int, size: int, micro_batch: int, steps: int
) -> dict:
    """Seconds per step of plain PyTorch AdamW and of a DeepSpeed ZeRO-3 engine, same model."""
    import deepspeed

    stage = StageConfig(
        name=kind, kind=kind, steps=1000, micro_batch=micro_batch, frames=frames, resolution=size
    )
    masks = MaskSampler({"random": 1.0}, (0.25, 0.75))
    video = _batch(frames, size, micro_batch)
    torch.manual_seed(0)
    base = build_model(ModelConfig(preset=preset))
    freeze_for(base, kind)

    plain = copy.deepcopy(base)
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def plain_step(i):
        gen = step_generator(0, 0, i)
        mask = masks.sample(micro_batch, frames, generator=gen)
        loss = plain(video, mask, kind=kind, generator=gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()

    ds_model = copy.deepcopy(base)
    ds_opt = torch.optim.AdamW([p for p in ds_model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(
        model=ds_model, optimizer=ds_opt, config=deepspeed_config(stage, on_gpu=False)
    )

    def ds_step(i):
        gen = step_generator(0, 0, i)
        mask = masks.sample(micro_batch, frames, generator=gen)
        loss = engine(video, mask, kind=kind, generator=gen)["loss"]
        engine.backward(loss)
        engine.step()

    # Interleave the two measurements so drift in machine load hits both alike.
    plain_s, ds_s = [], []
    for _ in range(2):
        plain_s.append(_time_steps(plain_step, steps))
        ds_s.append(_time_steps(ds_step, steps))
    plain_t, ds_t = min(plain_s), min(ds_s)
    tokens = tokens_per_sample(base, stage) * micro_batch
    return {
        "kind": kind,
        "plain_s": plain_t,
        "ds_s": ds_t,
        "samples_plain": micro_batch / plain_t,
        "samples_ds": micro_batch / ds_t,
        "tokens_ds": tokens / ds_t,
        "ratio": plain_t / ds_t,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29517")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rows = [
        bench_kind(args.preset, k, args.frames, args.size, args.micro_batch, args.steps)
        for k in ("mar", "dm", "joint")
    ]
    print(
        f"\npreset {args.preset}, {args.frames} frames at {args.size} px, micro-batch {args.micro_batch}, "
        f"{torch.get_num_threads()} threads, 1 process, CPU"
    )
    print(
        f"{'kind':6} {'plain s/step':>13} {'ZeRO-3 s/step':>14} {'plain samples/s':>16} {'ZeRO-3 samples/s':>17} {'ZeRO-3 tokens/s':>16} {'ZeRO-3/plain speed':>19}"
    )
    for r in rows:
        print(
            f"{r['kind']:6} {r['plain_s']:13.4f} {r['ds_s']:14.4f} {r['samples_plain']:16.2f} "
            f"{r['samples_ds']:17.2f} {r['tokens_ds']:16.0f} {r['ratio']:19.2f}"
        )


if __name__ == "__main__":
    main()
