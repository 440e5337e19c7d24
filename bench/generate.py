"""Generation speed and memory on the paper's efficiency task: 13 frames (1 given, 12
generated: image-to-video) at 512 px, DDIM 25 steps, bf16, random weights.

Rows: the generator's temporal attention (the paper's default DM) and spatio-temporal
attention (its /ST variant), without and with classifier-free guidance (2.5, the paper's
image-to-video scale, doubles the generator's batch), measured side by side in one run
with one model (the generator's attention is chosen per call; the weights are the same). Each
row: seconds per clip (autoencoder encode/decode included), per generated frame and per frame,
peak memory (on GPU the CUDA allocator's peak over the row's run, in this process: one model
is alive; on CPU the peak RSS above the pre-build RSS, in a fresh process), analytic FLOPs per clip (``mardini.models.flops.sample_flops``) and the FLOP/s achieved.

On a GPU (guarded by ``torch.cuda.is_available()``): the ``paper`` preset. The paper reports
6.05 s and 42.57 GB for this task on one A100 in bf16, and 0.46 s per frame for the
temporal-attention generator at 512 px. On CPU: the ``tiny`` preset at its own 32 px, fp32.

    .venv/bin/python bench/generate.py [--repeats 2]
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from asymmetry import Workload, parser_for, peak_memory_mib  # bench/ is the script's directory

from mardini.config import ModelConfig
from mardini.models.flops import sample_flops


def _progress(message: str) -> None:
    """A line on stderr as each measurement ends: a run cut short still shows what it got."""
    print(f"[generate] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = parser_for(__doc__, frames=13, cpu_resolution=32, repeats=2)
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.5])
    parser.add_argument(
        "--attentions",
        nargs="+",
        choices=["temporal", "spatiotemporal"],
        default=["temporal", "spatiotemporal"],
        help="generator attention variants to measure (rows)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    on_cuda = args.device == "cuda"

    # One model serves every row: the generator's attention is chosen per call (same weights).
    cfg = ModelConfig(preset=args.preset, generator={"attention": args.attentions[0]})
    kwargs = {
        "cfg": cfg,
        "task": "sample",
        "frames": args.frames,
        "resolution": args.resolution,
        "device": args.device,
        "dtype": dtype,
        "steps": args.steps,
        "backend": args.backend,
        "compiled": args.compile,
    }
    rows = [
        {"attention": attention, "cfg": scale, "times": []}
        for attention in args.attentions
        for scale in args.cfg_scales
    ]
    start = time.perf_counter()
    work = Workload(**kwargs)
    _progress(f"model built in {time.perf_counter() - start:.1f} s")

    def run(row: dict, i: int) -> float:
        """Seconds for one clip of ``row``."""
        work.attention, work.cfg_scale = row["attention"], row["cfg"]
        start = time.perf_counter()
        work.run(i)
        return time.perf_counter() - start

    for row in rows:
        # Warm-up: allocator, kernels, autotuning, compilation (reported: a compiled model
        # pays its compilation here, once per attention and batch shape).
        row["warmup_s"] = run(row, 0)
        _progress(f"{row['attention']} cfg {row['cfg']}: warm-up {row['warmup_s']:.1f} s")
    # Repeats interleaved so drift in machine load hits every row alike. On CUDA the peak of
    # the allocator over a row's run is that row's memory (weights and that clip's activations:
    # nothing else is alive); on CPU it is measured in a fresh process below.
    for r in range(args.repeats):
        for row in rows:
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            row["times"].append(run(row, 1 + r))
            if on_cuda:
                row["mib"] = torch.cuda.max_memory_allocated() / 2**20
            _progress(f"{row['attention']} cfg {row['cfg']}: {row['times'][-1]:.2f} s")
    work = None  # the CPU memory rows below build their own model, in a fresh process
    for row in rows:
        row["s"] = min(row["times"])
        row_cfg = ModelConfig(preset=args.preset, generator={"attention": row["attention"]})
        row["flop"] = sample_flops(
            row_cfg, args.frames, args.resolution, args.steps, 1, "joint", row["cfg"]
        )
        if not on_cuda and not args.skip_memory:
            # Memory of a clip does not grow with the number of steps: two are enough.
            extra = {"cfg": row_cfg, "steps": 2, "cfg_scale": row["cfg"]}
            row["mib"] = peak_memory_mib(**{**kwargs, **extra})
        if args.skip_memory:
            row.pop("mib", None)

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"\ngeneration: preset {args.preset}, {args.frames} frames (1 given, {args.frames - 1} "
        f"generated) at {args.resolution} px, DDIM {args.steps} steps, {args.dtype}, {where} "
        f"({torch.get_num_threads()} threads), attention {args.backend}"
        + (", compiled blocks" if args.compile else "")
    )
    unit, scale = ("TFLOP", 1e12) if args.device == "cuda" else ("GFLOP", 1e9)
    print(
        f"{'generator attention':20} {'cfg':>4} {'s/clip':>8} {'s/gen frame':>12} {'s/frame':>8} "
        f"{'peak MiB':>9} {unit + '/clip':>11} {unit + '/s':>8} {'warm-up s':>10}"
    )
    for row in rows:
        mib = f"{row['mib']:.0f}" if "mib" in row else "-"
        print(
            f"{row['attention']:20} {row['cfg']:4.1f} {row['s']:8.2f} "
            f"{row['s'] / (args.frames - 1):12.3f} {row['s'] / args.frames:8.3f} {mib:>9} "
            f"{row['flop'] / scale:11.1f} {row['flop'] / scale / row['s']:8.2f} "
            f"{row['warmup_s']:10.1f}"
        )


if __name__ == "__main__":
    main()
