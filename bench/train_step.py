"""Training-step throughput: DeepSpeed ZeRO-3 vs a plain PyTorch step, and MFU on a GPU.

On CPU (per stage kind): same model, same batch, measured side by side in one run. The ratio is
ZeRO-3's overhead (partition gather/scatter hooks; there is nothing to shard across one
process); the analytic model FLOPs of a step (``mardini.models.flops.train_flops``) give the
GFLOP/s each achieves.

On a GPU (guarded by ``torch.cuda.is_available()``): a ``joint`` step of a paper-shaped model
that fits one GPU: the ``paper`` preset's widths, MLPs, patches and sequence lengths (9 frames
at 512 px: 2304 planner + 9216 generator tokens per clip) with fewer blocks (``--planner-depth``,
``--generator-depth``), under ZeRO-3 and bf16, activation checkpointing off and on. Latents are
computed once up front (as with a latent cache), so the frozen autoencoder is not timed. Printed:
seconds per step, tokens/s, achieved TFLOP/s (model FLOPs: checkpointing's recomputation is not
counted) and MFU against the GPU's dense bf16 peak (``flops.peak_tflops``; ``--peak-tflops``
overrides). Target: MFU >= 50 % on an H100; ``--backends flex`` and ``--compile`` are the levers,
``--plain`` adds a plain PyTorch step (what ZeRO-3 costs on one GPU) and ``--profile`` prints
the CUDA kernels that take each row's time.

    DS_ACCELERATOR=cpu .venv/bin/python bench/train_step.py [--preset tiny] [--steps 10]
    .venv/bin/python bench/train_step.py --micro-batch 2 [--backends sdpa flex] [--compile] \
        [--checkpointing off on] [--plain] [--profile]                            # GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import warnings

import torch

from mardini.config import ModelConfig, StageConfig
from mardini.masking import MaskSampler
from mardini.models import build_model
from mardini.models.attention import compile_blocks, set_attention_backend
from mardini.models.flops import mfu, peak_tflops, train_flops
from mardini.train.engine import deepspeed_config, freeze_for, step_generator, tokens_per_sample


def _batch(frames: int, size: int, micro_batch: int) -> torch.Tensor:
    return (
        torch.rand(micro_batch, frames, 3, size, size, generator=torch.Generator().manual_seed(0))
        * 2
        - 1
    )


def _time_steps(step, steps: int, warmup: int = 2, cuda: bool = False) -> float:
    """Seconds per step after ``warmup`` untimed steps (synchronising the GPU around them)."""
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if cuda:
        torch.cuda.synchronize()
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
    flops = train_flops(base.cfg, kind, frames, size, micro_batch)
    return {
        "kind": kind,
        "plain_s": plain_t,
        "ds_s": ds_t,
        "samples_plain": micro_batch / plain_t,
        "samples_ds": micro_batch / ds_t,
        "tokens_ds": tokens / ds_t,
        "ratio": plain_t / ds_t,
        "gflop": flops / 1e9,
        "gflops_plain": flops / plain_t / 1e9,
        "gflops_ds": flops / ds_t / 1e9,
    }


def gpu_config(args: argparse.Namespace, checkpointing: bool) -> ModelConfig:
    """The paper-shaped model of the GPU run: the preset's layers, fewer of them."""
    return ModelConfig(
        preset=args.gpu_preset,
        planner={"depth": args.planner_depth},
        generator={"depth": args.generator_depth},
        activation_checkpointing=checkpointing,
    )


def bench_gpu(
    args: argparse.Namespace,
    checkpointing: bool,
    device: torch.device,
    backend: str = "sdpa",
    engine_kind: str = "zero3",
) -> dict:
    """One ``joint`` bf16 configuration on the GPU: time, tokens/s, TFLOP/s, MFU, memory.

    ``engine_kind``: ``zero3`` (DeepSpeed ZeRO-3, bf16 weights, as the trainer runs) or
    ``plain`` (torch AdamW on fp32 weights under bf16 autocast: what ZeRO-3 costs on one GPU).
    """
    import deepspeed

    on_cuda = device.type == "cuda"  # False only when smoke-testing this path on CPU
    frames, size, mb = args.gpu_frames, args.gpu_size, args.micro_batch
    cfg = gpu_config(args, checkpointing)
    stage = StageConfig(
        name="joint", kind="joint", steps=1000, micro_batch=mb, frames=frames, resolution=size
    )
    torch.manual_seed(0)
    with device:  # initialise on the GPU: a billion parameters init slowly on CPU
        model = build_model(cfg)
    set_attention_backend(model, backend)
    freeze_for(model, "joint")
    video = _batch(frames, size, mb).to(device)
    with torch.no_grad():  # the frozen autoencoder, once, before ZeRO-3 partitions its weights
        latents = tuple(z.to(torch.bfloat16) for z in model.encode(video))
    tokens = tokens_per_sample(model, stage) * mb
    if args.compile:
        compile_blocks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    masks = MaskSampler({"random": 1.0}, (0.15, 0.6))  # the joint-512 stage's kept frames
    if engine_kind == "zero3":
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt, config=deepspeed_config(stage, on_gpu=True)
        )

        def step(i):
            gen = step_generator(0, 0, i)
            mask = masks.sample(mb, frames, generator=gen).to(device)
            loss = engine(video, mask, kind="joint", generator=gen, latents=latents)["loss"]
            engine.backward(loss)
            engine.step()

    elif engine_kind == "plain":
        plain_latents = tuple(z.float() for z in latents)

        def step(i):
            gen = step_generator(0, 0, i)
            mask = masks.sample(mb, frames, generator=gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(video, mask, kind="joint", generator=gen, latents=plain_latents)
            opt.zero_grad(set_to_none=True)
            loss["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage.optimizer.grad_clip)
            opt.step()

    else:
        raise ValueError(f"unknown engine {engine_kind!r}; use zero3 or plain")

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _time_steps(step, args.steps, warmup=3, cuda=on_cuda)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else float("nan")
    if args.profile and on_cuda:
        _print_profile(step, f"{engine_kind} {backend} checkpointing {checkpointing}")
    flops = train_flops(cfg, "joint", frames, size, mb)
    return {
        "row": f"{engine_kind} {backend}" + (" compiled" if args.compile else ""),
        "ckpt": "on" if checkpointing else "off",
        "s": seconds,
        "tokens_s": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": mfu(flops, seconds, device, peak=args.peak_tflops),
        "peak_gib": peak_gib,
        "tflop": flops / 1e12,
    }


def _print_profile(step, title: str, top: int = 15) -> None:
    """The CUDA kernels that take a step's time: where the MFU gap lives (stderr)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(10**6)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top)
    print(f"\nprofile, one step, {title}:\n{table}", file=sys.stderr, flush=True)


def main_gpu(args: argparse.Namespace) -> None:
    """The GPU table: bf16 ``joint`` step per attention backend and checkpointing setting."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda", torch.cuda.current_device())
    runs = [("zero3", b, c == "on") for b in args.backends for c in args.checkpointing]
    if args.plain:
        runs.append(("plain", args.backends[0], False))
    rows = []
    for engine_kind, backend, ckpt in runs:
        rows.append(bench_gpu(args, ckpt, device, backend, engine_kind))
        r = rows[-1]
        print(
            f"[train_step] {r['row']}, checkpointing {r['ckpt']}: {r['s']:.3f} s/step",
            file=sys.stderr,
            flush=True,
        )
        gc.collect()  # the engine of this row goes before the next one is built
        torch.cuda.empty_cache()
    cfg = gpu_config(args, False)
    peak = args.peak_tflops or peak_tflops("cuda")
    print(
        f"\n{torch.cuda.get_device_name()} (dense bf16 peak {peak or '?'} TFLOP/s), bf16, "
        f"joint step: preset {args.gpu_preset} layers with planner depth {cfg.planner.depth}, "
        f"generator depth {cfg.generator.depth} ({cfg.generator.attention} attention), "
        f"{args.gpu_frames} frames at {args.gpu_size} px, micro-batch {args.micro_batch}"
        + (", compiled blocks" if args.compile else "")
        + "; zero3 = DeepSpeed ZeRO-3 (bf16 weights), plain = torch AdamW + bf16 autocast"
    )
    print(
        f"{'engine, attention':24} {'checkpointing':14} {'s/step':>8} {'tokens/s':>10} "
        f"{'TFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}"
    )
    for r in rows:
        mfu_txt = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    -"
        print(
            f"{r['row']:24} {r['ckpt']:14} {r['s']:8.3f} {r['tokens_s']:10.0f} "
            f"{r['tflop']:11.2f} {r['tflops']:8.1f} {mfu_txt:>6} {r['peak_gib']:9.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="CPU: model preset")
    parser.add_argument("--frames", type=int, default=8, help="CPU: frames per clip")
    parser.add_argument("--size", type=int, default=32, help="CPU: frame size in px")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="the CPU table even with a GPU")
    parser.add_argument("--gpu-preset", default="paper", help="GPU: whose layers to use")
    parser.add_argument("--gpu-frames", type=int, default=9)
    parser.add_argument("--gpu-size", type=int, default=512)
    parser.add_argument("--planner-depth", type=int, default=4, help="GPU (paper: 16)")
    parser.add_argument("--generator-depth", type=int, default=8, help="GPU (paper: 8)")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["sdpa", "flex"],
        default=["sdpa"],
        help="GPU: attention backends to measure (rows)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="GPU: also a plain PyTorch step (AdamW, bf16 autocast), ZeRO-3's cost on one GPU",
    )
    parser.add_argument(
        "--profile", action="store_true", help="GPU: print each row's top CUDA kernels (stderr)"
    )
    parser.add_argument("--compile", action="store_true", help="GPU: torch.compile each block")
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="GPU: activation checkpointing settings to measure (rows)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU: override the peak")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=FutureWarning)
    from mardini.train.engine import pick_accelerator

    on_gpu = pick_accelerator(force_cpu=args.cpu)
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29517")
    if on_gpu:
        main_gpu(args)
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rows = [
        bench_kind(args.preset, k, args.frames, args.size, args.micro_batch, args.steps)
        for k in ("mar", "dm", "joint")
    ]
    print(
        f"\npreset {args.preset}, {args.frames} frames at {args.size} px, "
        f"micro-batch {args.micro_batch}, {torch.get_num_threads()} threads, 1 process, CPU"
    )
    print(
        f"{'kind':6} {'plain s/step':>13} {'ZeRO-3 s/step':>14} {'plain samples/s':>16} "
        f"{'ZeRO-3 samples/s':>17} {'ZeRO-3 tokens/s':>16} {'ZeRO-3/plain speed':>19} "
        f"{'GFLOP/step':>11} {'plain GFLOP/s':>14} {'ZeRO-3 GFLOP/s':>15}"
    )
    for r in rows:
        print(
            f"{r['kind']:6} {r['plain_s']:13.4f} {r['ds_s']:14.4f} {r['samples_plain']:16.2f} "
            f"{r['samples_ds']:17.2f} {r['tokens_ds']:16.0f} {r['ratio']:19.2f} "
            f"{r['gflop']:11.2f} {r['gflops_plain']:14.2f} {r['gflops_ds']:15.2f}"
        )


if __name__ == "__main__":
    main()
