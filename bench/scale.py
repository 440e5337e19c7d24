"""Does the tiny generator learn with more steps, a bigger batch or more data? (issue 12)

``bench/quality.py`` measures the demo's own recipe on CPU, where a few hundred steps fit. This
asks what the same model does far beyond that budget, on a GPU, to tell the three possible
limits apart: compute (it learns, given steps), data (it learns only from more clips) or the
model itself (it does not learn either way). Two parts:

    # here, where the demo dataset and PyAV are: decode it into one file (a few MB)
    .venv/bin/python bench/scale.py prepare --store .mardini --out out/scale/data.pt
    # on the GPU machine (torch, einops, pydantic; no PyAV or webdataset needed)
    python bench/scale.py run --data out/scale/data.pt --device cuda --budget-s 300

``prepare`` writes the demo dataset's train and validation clips (8 frames at 32 px, 8 fps:
the joint stages' clips) and scikit-image's photographs (the sources of the synthetic clips).
``run`` trains one process per variant, all at once, the generator alone (the ``dm`` kind:
null planning) with the demo's model, loss and augmentation and a task mixture that holds both
evaluated tasks; at each milestone it prints held-out interpolation and image-to-video PSNR of
the sampled frames and the one-call x0 estimate, beside nearest-frame and linear blend, on the
real validation video and on synthetic clips of camera paths never trained on. The ``pool``
variants train on the demo's clips plus ``--pool`` freshly rendered synthetic clips (the demo
has about 450), so data volume is the only difference to their ``demo`` twins. Each process
stops at its deadline and reports the milestones it reached.

The model is the ``--config``'s (``configs/tiny.yaml``), the optimizer the trainer's defaults.
The runs in issue 12's note (2026-12-04) predate both: they trained tiny.yaml's model before
``time_shift`` (shift 1) with AdamW betas (0.9, 0.99).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRAMES, SIZE, FPS = 8, 32, 8.0
TASKS = {"interpolation": 0.4, "i2v": 0.3, "random": 0.3}
KEEP = (0.125, 0.75)
MILESTONES = (250, 1000, 3000, 8000, 20000)


# name -> data ("demo": its ~430 clips; "pool": those plus --pool fresh synthetic ones), batch,
# learning rate, generator overrides, the reference path's GAIN, seed.
def _v(data, batch, lr=1e-3, model=None, gain=None, seed=0):
    return {
        "data": data,
        "batch": batch,
        "lr": lr,
        "model": model or {},
        "gain": gain,
        "seed": seed,
    }


VARIANTS = {
    "demo-b4": _v("demo", 4),
    "demo-b4-s1": _v("demo", 4, seed=1),
    "demo-b8": _v("demo", 8),
    "demo-b32": _v("demo", 32),
    "demo-b32-gain1": _v("demo", 32, gain=1.0),
    "demo-b32-motion": _v("demo", 32, model={"reference_motion": True}),
    "pool-b8": _v("pool", 8),
    "pool-b32": _v("pool", 32),
    "pool-b32-gain1": _v("pool", 32, gain=1.0),
    "pool-b32-motion": _v("pool", 32, model={"reference_motion": True}),
    "pool-b32-noref": _v("pool", 32, model={"reference_path": False}),
    "pool-b32-wide": _v("pool", 32, model={"width": 256, "depth": 6, "mlp": 1024, "heads": 8}),
    "pool-b32-lr3e-4": _v("pool", 32, lr=3e-4),
}


def prepare(store: str, out: str) -> None:
    from data_prep.synthetic import PHOTOS, load_photo, photo_dir
    from mardini.data import val_batches
    from mardini.storage import join

    shards = join(store, "shards", "demo")
    data = {}
    for split in ("train", "val"):
        clips = [
            b.video
            for b in val_batches(
                shards, frames=FRAMES, resolution=SIZE, fps=FPS, batch=16, split=split
            )
        ]
        video = torch.cat(clips)
        data[split] = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        print(f"{split}: {tuple(video.shape)}")
    photos = []
    for name in PHOTOS:
        photo = load_photo(photo_dir() / name, max_side=256)
        photos.append(((photo + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    data["photos"] = photos
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, out)
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


def _load(relative: str):
    """A module loaded from its file, past its package's ``__init__`` (``data_prep`` and
    ``mardini.eval`` import PyAV, which the GPU machine lacks; what is used here needs torch)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location("_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def render_pool(photos: list[torch.Tensor], count: int, seed: int) -> torch.Tensor:
    """``count`` synthetic clips ``N T 3 H W`` uint8 over the photographs, camera paths drawn
    from ``seed`` (the demo's renderer, at the clips' size)."""
    synthesize = _load("data_prep/synthetic.py").synthesize

    out = torch.empty(count, FRAMES, 3, SIZE, SIZE, dtype=torch.uint8)
    for i in range(count):
        photo = _to_float(photos[i % len(photos)])
        clip = synthesize(photo, FRAMES, SIZE, seed=seed + i)
        out[i] = ((clip + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out


def _pool_part(args):
    photos, count, seed = args
    torch.set_num_threads(1)
    return render_pool(photos, count, seed)


def parallel_pool(photos, count: int, seed: int, workers: int) -> torch.Tensor:
    per = math.ceil(count / workers)
    jobs = [(photos, min(per, count - k * per), seed + k * per) for k in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_pool_part, [j for j in jobs if j[1] > 0])
    return torch.cat(parts)


@torch.no_grad()
def evaluate(model, clips_u8: torch.Tensor, device, seed: int = 0) -> dict[str, float]:
    metrics = _load("mardini/eval/metrics.py")
    baseline, psnr = metrics.baseline, metrics.psnr
    from mardini.masking import i2v_mask, interpolation_mask

    sums: dict[str, list[float]] = {}
    for start in range(0, len(clips_u8), 16):
        video = _to_float(clips_u8[start : start + 16]).to(device)
        b = video.shape[0]
        for task, make in (("interp", interpolation_mask), ("i2v", i2v_mask)):
            mask = make(FRAMES, b)
            gen = torch.Generator(device="cpu").manual_seed(seed + start)
            sample = model.sample(video, mask.to(device), steps=25, kind="dm", generator=gen)
            gen = torch.Generator(device="cpu").manual_seed(seed + start)
            x0 = model.predict_x0(video, mask.to(device), kind="dm", generator=gen)
            outs = {"model": sample, "x0": x0}
            for base in ("nearest", "blend"):
                outs[base] = baseline(video.cpu(), mask, base).to(device)
            for name, out in outs.items():
                frames = psnr(out, video).cpu()[~mask]
                sums.setdefault(f"{task}_{name}", []).extend(frames.tolist())
    return {k: sum(v) / len(v) for k, v in sums.items()}


def train_variant(name, config, data_path, device, deadline, out, milestones, threads):
    from mardini.config import OptimizerConfig, load_config
    from mardini.data.augment import augment_clips
    from mardini.masking import MaskSampler
    from mardini.models import build_model

    v = VARIANTS[name]
    data_kind, batch, lr, overrides = v["data"], v["batch"], v["lr"], v["model"]
    if v["gain"] is not None:
        from mardini.models.generator import ReferencePath

        ReferencePath.GAIN = v["gain"]
    torch.set_num_threads(threads)
    torch.manual_seed(v["seed"])
    data = torch.load(data_path)
    train = data["train"]
    if data_kind == "pool":
        extra = torch.load(Path(out).parent / "pool.pt")
        train = torch.cat([train, extra])
    held_synth = torch.load(Path(out).parent / "heldout_synthetic.pt")
    # The demo's model (the config's ``model:``), with the variant's generator overrides.
    sets = [f"model.generator.{key}={json.dumps(value)}" for key, value in overrides.items()]
    cfg = load_config(config, sets).model
    model = build_model(cfg).to(device)
    params = [p for p in model.generator.parameters() if p.requires_grad]
    # The trainer's optimizer settings (mardini.train.engine imports MLflow, which the GPU
    # machine lacks, so its lr_lambda is written out here: warm-up, then cosine to the floor
    # over the longest milestone).
    optim = OptimizerConfig(lr=lr, warmup_steps=20)
    opt = torch.optim.AdamW(params, lr=lr, betas=optim.betas, weight_decay=optim.weight_decay)
    warmup, floor, total = optim.warmup_steps, optim.min_lr_ratio, milestones[-1]

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    masks = MaskSampler(TASKS, KEEP)
    gen = torch.Generator().manual_seed(v["seed"])
    ema = [p.detach().clone() for p in params]
    started = time.time()
    step, losses = 0, []
    with open(out, "a") as log:
        while time.time() < deadline and step < total:
            idx = torch.randint(len(train), (batch,), generator=gen)
            video = augment_clips(_to_float(train[idx]), gen).to(device)
            mask = masks.sample(batch, FRAMES, generator=gen).to(device)
            model.train()
            loss = model(video, mask, kind="dm")["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.lerp_(p, 0.002)
            losses.append(loss.item())
            step += 1
            if step in milestones:
                model.eval()
                row = {"variant": name, "steps": step, "seconds": time.time() - started}
                row["loss"] = sum(losses[-100:]) / len(losses[-100:])
                row["val"] = evaluate(model, data["val"], device)
                row["synth"] = evaluate(model, held_synth, device)
                saved = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for e, p in zip(ema, params, strict=True):
                        p.copy_(e)
                row["val_ema"] = evaluate(model, data["val"], device)
                with torch.no_grad():
                    for s, p in zip(saved, params, strict=True):
                        p.copy_(s)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"{name} {step} steps {row['seconds']:.0f}s", flush=True)
    print(f"{name}: stopped at {step} steps", flush=True)


def table(path: str) -> str:
    rows = [json.loads(line) for line in open(path)]
    rows.sort(key=lambda r: (r["variant"], r["steps"]))
    head = (
        "| variant | steps | s | loss | val interp | x0 | ema | nearest | blend | "
        "val i2v | x0 | ema | copy | synth interp | blend | synth i2v | copy |"
    )
    lines = [head, "|" + "---|" * 17]
    for r in rows:
        v, s, e = r["val"], r["synth"], r["val_ema"]
        cells = [
            r["variant"],
            r["steps"],
            f"{r['seconds']:.0f}",
            f"{r['loss']:.2f}",
            f"{v['interp_model']:.2f}",
            f"{v['interp_x0']:.2f}",
            f"{e['interp_model']:.2f}",
            f"{v['interp_nearest']:.2f}",
            f"{v['interp_blend']:.2f}",
            f"{v['i2v_model']:.2f}",
            f"{v['i2v_x0']:.2f}",
            f"{e['i2v_model']:.2f}",
            f"{v['i2v_nearest']:.2f}",
            f"{s['interp_model']:.2f}",
            f"{s['interp_blend']:.2f}",
            f"{s['i2v_model']:.2f}",
            f"{s['i2v_nearest']:.2f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def run(args) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "rows.jsonl"
    results.unlink(missing_ok=True)
    data = torch.load(args.data)
    start = time.time()
    print(f"train {tuple(data['train'].shape)}, val {tuple(data['val'].shape)}", flush=True)
    photos = data["photos"]
    pool = parallel_pool(photos, args.pool, seed=1_000_000, workers=args.workers)
    torch.save(pool, out_dir / "pool.pt")
    held = parallel_pool(photos, 64, seed=9_000_000, workers=args.workers)
    torch.save(held, out_dir / "heldout_synthetic.pt")
    print(f"rendered {len(pool)} + {len(held)} synthetic clips in {time.time() - start:.0f}s")
    deadline = start + args.budget_s
    milestones = tuple(int(m) for m in args.milestones.split(","))
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    threads = max(1, (os.cpu_count() or 1) // len(names))
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=train_variant,
            args=(
                n,
                args.config,
                args.data,
                args.device,
                deadline,
                str(results),
                milestones,
                threads,
            ),
        )
        for n in names
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(1.0, deadline + 120 - time.time()))
        if p.is_alive():
            p.terminate()
    if results.exists():
        text = table(str(results))
        (out_dir / "table.md").write_text(text + "\n")
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--store", default=".mardini")
    p.add_argument("--out", default="out/scale/data.pt")
    r = sub.add_parser("run")
    r.add_argument("--data", default="out/scale/data.pt")
    r.add_argument("--config", default="configs/tiny.yaml", help="whose model: is trained")
    r.add_argument("--out", default=os.environ.get("OUT", "out/scale"))
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--budget-s", type=float, default=300)
    r.add_argument("--pool", type=int, default=8192)
    r.add_argument("--milestones", default=",".join(map(str, MILESTONES)))
    r.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    r.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.store, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
