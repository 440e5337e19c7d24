"""MarDini's central claim, measured: asymmetric (heavy planner at low resolution + light
generator at high resolution) vs a symmetric baseline, same frames, same output resolution.

Symmetric baseline: the same model with ``planner_downscale = 1``: the planner (same depth,
width and MLP, full spatio-temporal attention) runs on the generator's high-resolution token
grid instead of the grid downscaled by 2 per side (4x the tokens, 16x the attention pairs).
The generator is unchanged, so the difference is exactly what putting the heavy network at low
resolution saves.

Reported for both, measured side by side in one run (timings interleaved, best of
``--repeats``), and their ratio: seconds per ``joint`` training step (AdamW, latents
precomputed, as with a latent cache), seconds per generated clip (image-to-video: first frame
given, DDIM ``--steps`` steps, autoencoder included), peak memory, and analytic model FLOPs
(``mardini.models.flops``). Peak memory is taken in a fresh process per measurement: on CPU
the peak RSS above the RSS before the model is built (weights, optimizer state, activations),
on GPU the CUDA allocator's peak. The analytic FLOPs of the paper preset at the paper's setting
(9 frames, 512 px, 25 steps) are printed as well; they need no hardware.

On CPU: the ``tiny`` preset, fp32, 9 frames at 64 px. On a GPU (guarded by
``torch.cuda.is_available()``): the ``paper`` preset in bf16, 9 frames at 512 px; generation
with the full model, training with depth divided by ``--train-depth-divisor`` (4: planner 4,
generator 2 blocks) so that AdamW state fits one GPU. The paper (one A100, bf16, 9 frames at
512 px) reports about 25 s / 74 GB symmetric vs 18 s / 41 GB asymmetric for generation.

    .venv/bin/python bench/asymmetry.py [--repeats 3] [--steps 25]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import time
import warnings
from pathlib import Path

import torch

from mardini.config import ModelConfig
from mardini.masking import i2v_mask
from mardini.models import build_model
from mardini.models.attention import compile_blocks, set_attention_backend
from mardini.models.flops import sample_flops, tokens_per_frame, train_flops

VARIANTS = ("asymmetric", "symmetric")


def variant_config(preset: str, variant: str, depth_divisor: int = 1) -> ModelConfig:
    """The preset as published (asymmetric) or with the planner at full resolution."""
    base = ModelConfig(preset=preset)
    data = {"preset": preset, "cfg_dropout": 0.0}
    if depth_divisor > 1:
        data["planner"] = {"depth": max(1, base.planner.depth // depth_divisor)}
        data["generator"] = {"depth": max(1, base.generator.depth // depth_divisor)}
    if variant == "symmetric":
        data["planner_downscale"] = 1
    elif variant != "asymmetric":
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    return ModelConfig(**data)


class Workload:
    """One model with its inputs: a ``joint`` training step or a sampled clip."""

    def __init__(
        self,
        cfg: ModelConfig,
        task: str,
        frames: int,
        resolution: int,
        device: str,
        dtype: torch.dtype,
        steps: int = 25,
        cfg_scale: float = 1.0,
        batch: int = 1,
        backend: str = "sdpa",
        compiled: bool = False,
        attention: str | None = None,
    ):
        self.task, self.device, self.dtype = task, torch.device(device), dtype
        self.steps, self.cfg_scale = steps, cfg_scale
        # The generator's attention for sampling (None: the config's); the weights are the
        # same for both, so one model serves temporal and spatio-temporal rows.
        self.attention = attention
        torch.manual_seed(0)
        with self.device:  # initialise on the device: paper-sized weights init fast on GPU
            model = build_model(cfg)
        set_attention_backend(model, backend)
        if compiled:
            compile_blocks(model)
        gen = torch.Generator().manual_seed(0)
        video = torch.rand(batch, frames, 3, resolution, resolution, generator=gen) * 2 - 1
        self.mask = i2v_mask(frames, batch=batch).to(self.device)
        if task == "train":
            # fp32 master weights, low-precision compute under autocast (mixed precision).
            self.amp = dtype != torch.float32
            self.model = model.train()
            with torch.no_grad(), self._autocast():
                self.latents = model.encode(video.to(self.device))
            params = [p for p in model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(params, lr=1e-4)
        elif task == "sample":
            self.amp = False
            self.model = model.to(dtype).eval()  # inference weights in the compute dtype
            self.video = video.to(self.device, dtype)
        else:
            raise ValueError(f"unknown task {task!r}; use train or sample")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp)

    def run(self, i: int = 0) -> None:
        """One training step, or one clip."""
        gen = torch.Generator().manual_seed(i)
        if self.task == "train":
            with self._autocast():
                loss = self.model(None, self.mask, "joint", gen, latents=self.latents)["loss"]
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        else:
            self.model.sample(
                self.video,
                self.mask,
                steps=self.steps,
                cfg_scale=self.cfg_scale,
                generator=gen,
                attention=self.attention,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _status_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _peak_child(kwargs: dict) -> float:
    """In a fresh process: build, warm up (optimizer state exists), then peak of one run.

    On CPU the process's RSS before the model is built (interpreter, torch) is subtracted.
    """
    warnings.filterwarnings("ignore")
    base = _status_mib("VmRSS")
    work = Workload(**kwargs)
    work.run(0)
    if work.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(work.device)
        work.run(1)
        return torch.cuda.max_memory_allocated(work.device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    work.run(1)
    return _status_mib("VmHWM") - base


def peak_memory_mib(**kwargs) -> float:
    """Peak memory (MiB) of one run of a ``Workload``, measured in a fresh process."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_child, (kwargs,))


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def parser_for(doc: str, frames: int, cpu_resolution: int, repeats: int):
    """The options this benchmark and bench/generate.py share (GPU defaults when one is here)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--preset", default="paper" if on_gpu else "tiny")
    parser.add_argument("--frames", type=int, default=frames)
    parser.add_argument("--resolution", type=int, default=512 if on_gpu else cpu_resolution)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per clip")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if on_gpu else "fp32")
    parser.add_argument("--backend", choices=["sdpa", "flex"], default="sdpa")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--skip-memory", action="store_true")
    return parser


def main() -> None:
    parser = parser_for(__doc__, frames=9, cpu_resolution=64, repeats=3)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument(
        "--train-depth-divisor", type=int, default=4 if torch.cuda.is_available() else 1
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    common = {
        "frames": args.frames,
        "resolution": args.resolution,
        "device": args.device,
        "dtype": dtype,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "backend": args.backend,
        "compiled": args.compile,
    }
    configs = {
        (v, task): variant_config(
            args.preset, v, args.train_depth_divisor if task == "train" else 1
        )
        for v in VARIANTS
        for task in ("train", "sample")
    }

    rows: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    for task in ("train", "sample"):
        works = {v: Workload(configs[v, task], task, **common) for v in VARIANTS}
        for work in works.values():
            work.run(0)  # warm-up: allocator, optimizer state, compilation
        # Interleave the variants so drift in machine load hits both alike.
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for v, work in works.items():
                start = time.perf_counter()
                work.run(1 + r)
                times[v].append(time.perf_counter() - start)
        for v in VARIANTS:
            rows[v][f"{task}_s"] = min(times[v])  # the run least disturbed by other load
        del works
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # leave the GPU to the memory-measuring processes
        for v in VARIANTS:
            cfg = configs[v, task]
            if task == "train":
                rows[v]["train_gflop"] = (
                    train_flops(cfg, "joint", args.frames, args.resolution) / 1e9
                )
            else:
                rows[v]["sample_gflop"] = (
                    sample_flops(
                        cfg, args.frames, args.resolution, args.steps, 1, "joint", args.cfg_scale
                    )
                    / 1e9
                )
            if not args.skip_memory:
                # Memory of a clip does not grow with the number of steps: two are enough.
                extra = {"steps": 2} if task == "sample" else {}
                rows[v][f"{task}_mib"] = peak_memory_mib(cfg=cfg, task=task, **{**common, **extra})

    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    cfg = configs["asymmetric", "train"]
    n_asym, big_n = tokens_per_frame(configs["asymmetric", "sample"], args.resolution)
    n_sym, _ = tokens_per_frame(configs["symmetric", "sample"], args.resolution)
    print(
        f"\nasymmetry: preset {args.preset}, {args.frames} frames at {args.resolution} px, "
        f"{args.dtype}, {device_name}, attention {args.backend}"
        + (", compiled blocks" if args.compile else "")
    )
    print(
        f"symmetric = planner_downscale 1: planner on {n_sym} tokens/frame instead of {n_asym} "
        f"(generator: {big_n}); training depth planner {cfg.planner.depth}, generator "
        f"{cfg.generator.depth}; sampling: i2v, DDIM {args.steps} steps, cfg {args.cfg_scale}"
    )
    cols = [
        ("train_s", "train s/step", "{:.3f}"),
        ("train_mib", "train peak MiB", "{:.0f}"),
        ("train_gflop", "train GFLOP", "{:.1f}"),
        ("sample_s", "sample s/clip", "{:.2f}"),
        ("sample_mib", "sample peak MiB", "{:.0f}"),
        ("sample_gflop", "sample GFLOP", "{:.1f}"),
    ]
    cols = [c for c in cols if c[0] in rows["asymmetric"]]
    print(f"{'':24}" + "".join(f"{title:>17}" for _, title, _ in cols))
    for v in VARIANTS:
        print(f"{v:24}" + "".join(f"{fmt.format(rows[v][k]):>17}" for k, _, fmt in cols))
    print(
        f"{'symmetric / asymmetric':24}"
        + "".join(
            f"{_fmt_ratio(rows['symmetric'][k], rows['asymmetric'][k]):>17}" for k, _, _ in cols
        )
    )

    # The paper's setting, analytically (no hardware needed).
    paper = {v: variant_config("paper", v) for v in VARIANTS}
    tr = {v: train_flops(paper[v], "joint", 9, 512) / 1e12 for v in VARIANTS}
    sa = {v: sample_flops(paper[v], 9, 512, 25) / 1e12 for v in VARIANTS}
    print(
        "\nanalytic, paper preset, 9 frames at 512 px: joint training step "
        f"{tr['asymmetric']:.1f} vs {tr['symmetric']:.1f} TFLOP per clip "
        f"({_fmt_ratio(tr['symmetric'], tr['asymmetric'])}); DDIM-25 clip "
        f"{sa['asymmetric']:.0f} vs {sa['symmetric']:.0f} TFLOP "
        f"({_fmt_ratio(sa['symmetric'], sa['asymmetric'])}); asymmetric vs symmetric"
    )


if __name__ == "__main__":
    main()
