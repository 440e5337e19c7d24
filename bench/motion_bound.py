"""How much knowing the motion could gain over the linear blend, on the held-out split and on
the training split: the instrument behind issue 12's last target (beat the blend).

Interpolation as ``mardini eval`` scores it (a clip's first and last frame given, every frame
between them generated, PSNR per generated frame averaged), at a stage's frames, resolution and
fps. Rows, none of them trained:

- ``nearest``, ``blend``: the evaluation's baselines.
- ``motion search``: classical bilateral block matching. For a frame at fraction ``a`` of the
  way from the first reference to the last and each integer motion ``v`` in ``[-R, R]^2``
  pixels across the whole gap, the candidate ``(1 - a) first(x - a v) + a last(x + (1 - a) v)``
  costs the mean squared difference of its two terms over a 5 x 5 window; the frame is the
  soft-argmin mix of the candidates. It reads only the two given frames, and no content. This
  is what ``model.generator.reference_search: R`` hands the generator
  (``mardini.models.generator.motion_search``), before any training.
- ``motion search, gated``: the same, mixed with the blend by how clearly the best motion
  matches better than no motion (log cost ratio): what a model could learn to do where it is
  unsure.
- ``oracle, motion per frame`` / ``oracle, motion per PxP patch``: the candidate that is closest
  to the true frame, chosen per frame / per patch *from the ground truth*: upper bounds for a
  model whose only freedom is one linear motion per frame / per patch.

Reading it: if motion search gains on the training split but not held out, what the model can
learn from this data about motion does not carry to the held-out video either; the oracles say
how much room there is.

    .venv/bin/python bench/motion_bound.py [--config configs/small.yaml] [--stage joint-i2v] \\
        [--splits val,train] [--clips 32] [--radius 2] [--patch 4]

The dataset is the config's (``mardini prep demo-data`` writes the demo's).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from mardini.config import load_config
from mardini.data import val_batches
from mardini.eval.evaluate import stage_eval_settings
from mardini.eval.metrics import baseline, psnr
from mardini.layout import shards_url
from mardini.masking import interpolation_mask
from mardini.models.generator import (
    SEARCH_WINDOW,
    motion_candidates,
    motion_search,
    neighbour_references,
)
from mardini.storage import store_root


def pick(frames_KNCHW: torch.Tensor, index_NHW: torch.Tensor) -> torch.Tensor:
    """Per pixel, the candidate ``index_NHW`` names: ``N C H W``."""
    _, n, c, h, w = frames_KNCHW.shape
    return frames_KNCHW.gather(0, index_NHW[None, :, None].expand(1, n, c, h, w))[0]


def interpolations(video_BT3HW: torch.Tensor, radius: int, patch: int):
    """The interpolation mask and each row's clips ``B T 3 H W`` (the given ends kept)."""
    b, t = video_BT3HW.shape[:2]
    mask = interpolation_mask(t, b)
    blend = baseline(video_BT3HW, mask, "blend")
    searched, clarity = motion_search(*neighbour_references(video_BT3HW, mask), radius)
    # Trust the search where its best motion clearly matches better than none.
    trust = torch.sigmoid(4 * clarity - 4)
    per_frame, per_patch = video_BT3HW.clone(), video_BT3HW.clone()
    first, last = video_BT3HW[:, 0], video_BT3HW[:, -1]
    for i in range(1, t - 1):
        a_N = torch.full((b,), i / (t - 1), dtype=video_BT3HW.dtype)
        frames, _ = motion_candidates(first, last, a_N, radius)
        error = (frames - video_BT3HW[:, i]).pow(2).mean(2)  # K N H W
        per_frame[:, i] = frames[error.flatten(2).mean(2).argmin(0), torch.arange(b)]
        best = F.avg_pool2d(error, patch).argmin(0)  # N H/p W/p
        per_patch[:, i] = pick(frames, best.repeat_interleave(patch, 1).repeat_interleave(patch, 2))
    rows = {
        "nearest": baseline(video_BT3HW, mask, "nearest"),
        "blend": blend,
        "motion search": searched,
        "motion search, gated": trust * searched + (1 - trust) * blend,
        "oracle, motion per frame": per_frame,
        f"oracle, motion per {patch}x{patch} patch": per_patch,
    }
    return mask, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--stage", default=None, help="default: the config's last stage")
    parser.add_argument("--splits", default="val,train", help="comma-separated split names")
    parser.add_argument("--store", default=None, help="default: $MARDINI_STORE or ./.mardini")
    parser.add_argument("--clips", type=int, default=32, help="clips per split")
    parser.add_argument("--radius", type=int, default=2, help="motions up to this many pixels")
    parser.add_argument("--patch", type=int, default=4, help="the per-patch oracle's patch")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_grad_enabled(False)
    cfg = load_config(args.config)
    stage = cfg.stage(args.stage or cfg.stages[-1].name)
    s = stage_eval_settings(cfg, stage.name)
    data = shards_url(cfg, store_root(args.store), stage)
    print(
        f"{args.config} {stage.name}: {s['frames']} frames at {s['resolution']} px, "
        f"interpolation from the first and last frame; motions up to {args.radius} px, "
        f"window {SEARCH_WINDOW}"
    )
    for split in args.splits.split(","):
        clips, seen = [], 0
        for batch in val_batches(
            data, frames=s["frames"], resolution=s["resolution"], fps=s["fps"], batch=8, split=split
        ):
            clips.append(batch.video[: args.clips - seen])
            seen += clips[-1].shape[0]
            if seen >= args.clips:
                break
        if not clips:
            raise SystemExit(f"{data}: no clips in split {split!r}")
        video = torch.cat(clips).double()
        mask, rows = interpolations(video, args.radius, args.patch)
        generated = ~mask
        scores = {name: psnr(clip, video)[generated].mean().item() for name, clip in rows.items()}
        print(f"\nsplit {split}: {video.shape[0]} clips")
        print(f"  {'':32} {'PSNR':>6} {'-near':>6} {'-blend':>6}")
        for name, value in scores.items():
            near, blend = value - scores["nearest"], value - scores["blend"]
            print(f"  {name:32} {value:6.2f} {near:+6.2f} {blend:+6.2f}")


if __name__ == "__main__":
    main()
