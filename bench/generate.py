"""Generation speed and memory on the paper's efficiency task: 13 frames (1 given, 12
generated: image-to-video) at 512 px, DDIM 25 steps, bf16, random weights.

Rows: the generator's temporal attention (the paper's default DM) and spatio-temporal
attention (its /ST variant), without and with classifier-free guidance (2.5, the paper's
image-to-video scale, doubles the generator's batch), measured side by side in one run. Each
row: seconds per clip (autoencoder encode/decode included), per generated frame and per frame,
peak memory (fresh process; CUDA allocator peak on GPU, peak RSS above the pre-build RSS on
CPU), analytic FLOPs per clip (``mardini.models.flops.sample_flops``) and the FLOP/s achieved.

On a GPU (guarded by ``torch.cuda.is_available()``): the ``paper`` preset. The paper reports
6.05 s and 42.57 GB for this task on one A100 in bf16, and 0.46 s per frame for the
temporal-attention generator at 512 px. On CPU: the ``tiny`` preset at its own 32 px, fp32.

    .venv/bin/python bench/generate.py [--repeats 2]
"""

from __future__ import annotations

import time
import warnings

import torch
from asymmetry import Workload, parser_for, peak_memory_mib  # bench/ is the script's directory

from mardini.config import ModelConfig
from mardini.models.flops import sample_flops


def main() -> None:
    parser = parser_for(__doc__, frames=13, cpu_resolution=32, repeats=2)
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.5])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    rows = []
    for attention in ("temporal", "spatiotemporal"):
        cfg = ModelConfig(preset=args.preset, generator={"attention": attention})
        for scale in args.cfg_scales:
            kwargs = {
                "cfg": cfg,
                "task": "sample",
                "frames": args.frames,
                "resolution": args.resolution,
                "device": args.device,
                "dtype": dtype,
                "steps": args.steps,
                "cfg_scale": scale,
                "backend": args.backend,
                "compiled": args.compile,
            }
            rows.append({"attention": attention, "cfg": scale, "kwargs": kwargs})

    # One model per generator attention serves both guidance scales; the repeats are
    # interleaved so drift in machine load hits every row alike.
    works = {}
    for row in rows:
        if row["attention"] not in works:
            works[row["attention"]] = Workload(**row["kwargs"])
        row["work"] = works[row["attention"]]
        row["work"].cfg_scale = row["cfg"]
        row["work"].run(0)  # warm-up: allocator, kernels, compilation
        row["times"] = []
    for r in range(args.repeats):
        for row in rows:
            row["work"].cfg_scale = row["cfg"]
            start = time.perf_counter()
            row["work"].run(1 + r)
            row["times"].append(time.perf_counter() - start)
    del works
    for row in rows:
        del row["work"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to the memory-measuring processes
    for row in rows:
        kw = row["kwargs"]
        row["s"] = min(row["times"])
        row["flop"] = sample_flops(
            kw["cfg"], args.frames, args.resolution, args.steps, 1, "joint", kw["cfg_scale"]
        )
        if not args.skip_memory:
            # Memory of a clip does not grow with the number of steps: two are enough.
            row["mib"] = peak_memory_mib(**{**kw, "steps": 2})

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
        f"{'peak MiB':>9} {unit + '/clip':>11} {unit + '/s':>8}"
    )
    for row in rows:
        mib = f"{row['mib']:.0f}" if "mib" in row else "-"
        print(
            f"{row['attention']:20} {row['cfg']:4.1f} {row['s']:8.2f} "
            f"{row['s'] / (args.frames - 1):12.3f} {row['s'] / args.frames:8.3f} {mib:>9} "
            f"{row['flop'] / scale:11.1f} {row['flop'] / scale / row['s']:8.2f}"
        )


if __name__ == "__main__":
    main()
