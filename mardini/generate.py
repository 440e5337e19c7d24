"""Generation from a trained checkpoint: interpolation, image-to-video, expansion, long video.

Shapes: T frames, 3 RGB, H W pixels; clips are ``T 3 H W`` in [-1, 1]. Given frames come back
exactly as given (``MarDini.sample`` keeps reference frames), so only masked frames are new.

- ``interpolate``: first and last frames given, ``frames - 2`` generated between them.
- ``image_to_video``: the first frame given, ``frames - 1`` generated after it.
- ``expand``: a clip of K frames continued by ``add`` frames; with ``window`` W the clip grows
  autoregressively, each call seeing the last ``W - n`` frames and adding ``n <= W // 2``.
- ``long_video``: hierarchical, as in the paper (a 32-frame window reaches 128 frames): one
  image-to-video call makes ``min(W, total)`` keyframes spread evenly over the whole duration;
  then every gap between neighbouring keyframes is filled by interpolation, recursively (a gap
  longer than the window first gets ``W`` keyframes of its own). Calls of one level that have
  the same length run as one batch.

Models load from any source ``mardini.export.load_model`` takes (a stage's ``final/`` export,
the stage directory above it, or ``models:/name@alias``); clips are read and written by
``mardini.video``.
Guidance: ``cfg_scale`` applies to image-to-video and expansion; interpolation runs unguided,
as in the paper (scale 2.5 for I2V, none for interpolation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mardini.export import sample_setting
from mardini.masking import expansion_mask, i2v_mask, interpolation_mask
from mardini.models import MarDini

log = logging.getLogger(__name__)

# (denoising steps done, total) over the whole generation job.
Progress = Callable[[int, int], None]

DEFAULT_RESOLUTION, DEFAULT_FPS = 32, 8.0


def sample_kind(meta: dict[str, Any]) -> str:
    """How a checkpoint samples: ``dm`` (null planning) for a dm stage, else ``joint``."""
    kind = meta.get("kind", "joint")
    if kind in ("mar", "autoencoder"):
        raise ValueError(
            f"checkpoint of stage {meta.get('stage')!r} is a {kind!r} stage: its generator is "
            "untrained; generate from a dm or joint stage"
        )
    return "dm" if kind == "dm" else "joint"


def options_for(
    meta: dict[str, Any],
    steps: int | None = None,
    solver: str | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
) -> SampleOptions:
    """Sampling options for a checkpoint: what is given; where ``None``, the sampler its stage
    was evaluated and gated with (its export's ``sample``: the curriculum's), else the
    defaults. Its gates hold for that sampler, so that is what it generates with."""

    def pick(key: str, value: Any) -> Any:
        return sample_setting(meta, key, getattr(SampleOptions, key)) if value is None else value

    return SampleOptions(
        steps=pick("steps", steps),
        solver=pick("solver", solver),
        cfg_scale=pick("cfg_scale", cfg_scale),
        seed=seed,
        kind=sample_kind(meta),
    )


# ----------------------------------------------------------------------------- sampling


@dataclass
class SampleOptions:
    """How to sample: denoising steps, solver, guidance, seed and stage kind."""

    steps: int = 25
    solver: str = "euler"
    cfg_scale: float = 1.0
    seed: int = 0
    kind: str = "joint"


class _Counter:
    """Turns per-call denoising steps into job-wide ``(done, total)`` progress."""

    def __init__(self, calls: int, steps: int, progress: Progress | None):
        self.total, self.steps, self.done, self.progress = calls * steps, steps, 0, progress

    def call(self) -> Callable[[int], None] | None:
        """The ``progress`` argument for the next ``MarDini.sample`` call."""
        if self.progress is None:
            return None
        base = self.done
        self.done += self.steps
        return lambda i: self.progress(base + i, self.total)


def _sample(
    model: MarDini,
    video_BT3HW: torch.Tensor,
    mask_BT: torch.Tensor,
    opts: SampleOptions,
    gen: torch.Generator,
    counter: _Counter,
    cfg_scale: float,
) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model.sample(
        video_BT3HW.to(device),
        mask_BT.to(device),
        steps=opts.steps,
        solver=opts.solver,
        cfg_scale=cfg_scale,
        kind=opts.kind,
        generator=gen,
        progress=counter.call(),
    )
    return out.cpu()


def interpolate(
    model: MarDini,
    first_3HW: torch.Tensor,
    last_3HW: torch.Tensor,
    frames: int,
    opts: SampleOptions | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``frames`` frames from ``first`` to ``last`` (both kept exactly); ``T 3 H W``."""
    opts = opts or SampleOptions()
    if frames < 3:
        raise ValueError(f"interpolation needs at least 3 frames (2 given + 1 new), got {frames}")
    if first_3HW.shape != last_3HW.shape:
        raise ValueError(
            f"first and last frames differ in size: {tuple(first_3HW.shape)} vs {tuple(last_3HW.shape)}"
        )
    video = first_3HW.new_zeros((1, frames, *first_3HW.shape))
    video[0, 0], video[0, -1] = first_3HW, last_3HW
    gen = torch.Generator().manual_seed(opts.seed)
    counter = _Counter(1, opts.steps, progress)
    return _sample(model, video, interpolation_mask(frames, keep=2), opts, gen, counter, 1.0)[0]


def image_to_video(
    model: MarDini,
    image_3HW: torch.Tensor,
    frames: int,
    opts: SampleOptions | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``frames`` frames starting with ``image`` (kept exactly); ``T 3 H W``."""
    opts = opts or SampleOptions()
    video = image_3HW.new_zeros((1, frames, *image_3HW.shape))
    video[0, 0] = image_3HW
    gen = torch.Generator().manual_seed(opts.seed)
    counter = _Counter(1, opts.steps, progress)
    return _sample(model, video, i2v_mask(frames), opts, gen, counter, opts.cfg_scale)[0]


def expansion_plan(given: int, add: int, window: int | None) -> list[tuple[int, int]]:
    """``(context frames, new frames)`` per call to add ``add`` frames to ``given`` frames."""
    if given < 1 or add < 1:
        raise ValueError(f"expansion needs >= 1 given and >= 1 added frame, got {given}, {add}")
    if window is None or given + add <= window:
        return [(given, add)]
    if window < 2:
        raise ValueError(f"expansion window must be at least 2 frames, got {window}")
    plan, have, left = [], given, add
    while left:
        new = min(max(1, window // 2), left)
        context = min(have, window - new)
        plan.append((context, new))
        have, left = have + new, left - new
    return plan


def expand(
    model: MarDini,
    video_T3HW: torch.Tensor,
    add: int,
    window: int | None = None,
    opts: SampleOptions | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``video`` (kept exactly) followed by ``add`` new frames; ``T+add 3 H W``."""
    opts = opts or SampleOptions()
    plan = expansion_plan(video_T3HW.shape[0], add, window)
    gen = torch.Generator().manual_seed(opts.seed)
    counter = _Counter(len(plan), opts.steps, progress)
    clip = video_T3HW
    for context, new in plan:
        chunk = torch.cat([clip[-context:], clip.new_zeros((new, *clip.shape[1:]))])[None]
        mask = expansion_mask(context + new, keep=context)
        out = _sample(model, chunk, mask, opts, gen, counter, opts.cfg_scale)[0]
        clip = torch.cat([clip, out[context:]])
    return clip


def _spread(start: int, end: int, count: int) -> list[int]:
    """``count`` distinct integer positions from ``start`` to ``end`` inclusive, evenly spaced."""
    return sorted({round(x) for x in np.linspace(start, end, count).tolist()})


def long_plan(total: int, window: int) -> tuple[list[int], list[list[list[int]]]]:
    """Keyframe positions, then per level the position lists each interpolation call fills
    (first and last of a list are known when the call runs)."""
    if window < 3:
        raise ValueError(f"long video needs a window of at least 3 frames, got {window}")
    if total < 2:
        raise ValueError(f"long video needs at least 2 frames, got {total}")
    keys = _spread(0, total - 1, min(window, total))
    levels: list[list[list[int]]] = []
    gaps = [(a, b) for a, b in zip(keys, keys[1:], strict=False) if b - a > 1]
    while gaps:
        level = [_spread(a, b, min(window, b - a + 1)) for a, b in gaps]
        levels.append(level)
        gaps = [(a, b) for p in level for a, b in zip(p, p[1:], strict=False) if b - a > 1]
    return keys, levels


def long_video(
    model: MarDini,
    image_3HW: torch.Tensor,
    window: int,
    total: int,
    opts: SampleOptions | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``total`` frames from one image: keyframes by image-to-video, gaps by interpolation."""
    opts = opts or SampleOptions()
    keys, levels = long_plan(total, window)
    calls = 1 + sum(len({len(p) for p in level}) for level in levels)
    counter = _Counter(calls, opts.steps, progress)
    gen = torch.Generator().manual_seed(opts.seed)
    out = image_3HW.new_zeros((total, *image_3HW.shape))
    clip = image_3HW.new_zeros((1, len(keys), *image_3HW.shape))
    clip[0, 0] = image_3HW
    out[keys] = _sample(model, clip, i2v_mask(len(keys)), opts, gen, counter, opts.cfg_scale)[0]
    for level in levels:
        for length in sorted({len(p) for p in level}):
            group = [p for p in level if len(p) == length]
            batch = torch.stack([out[p] for p in group])  # B length 3 H W; middle frames unused
            mask = torch.zeros(len(group), length, dtype=torch.bool)
            mask[:, 0] = mask[:, -1] = True
            filled = _sample(model, batch, mask, opts, gen, counter, 1.0)
            for positions, frames in zip(group, filled, strict=True):
                out[positions[1:-1]] = frames[1:-1]
    return out
