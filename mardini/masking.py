"""Frame masks: which frames of a clip are given (references) and which the model generates.

A mask is a bool tensor ``B T``: True = reference frame (kept, clean), False = masked frame
(replaced by ``[MASK]`` in the planner, noised in the generator, covered by the loss).
At least one frame is always masked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

TASKS = ("interpolation", "i2v", "expansion", "random")


def _check_frames(frames: int) -> None:
    if frames < 2:
        raise ValueError(f"a mask needs at least 2 frames (one given, one generated), got {frames}")


def interpolation_mask(frames: int, batch: int = 1, keep: int = 2) -> torch.Tensor:
    """Keep ``keep`` evenly spaced frames including the first and the last; generate the rest."""
    _check_frames(frames)
    keep = max(2, min(keep, frames - 1)) if frames > 2 else 1
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    if frames == 2:
        mask[:, 0] = True
        return mask
    index = torch.linspace(0, frames - 1, keep).round().long()
    mask[:, index] = True
    # Rounding can merge two indices on short clips; top up from the left so `keep` holds.
    missing = keep - int(mask[0].sum())
    for t in range(frames):
        if missing <= 0:
            break
        if not mask[0, t]:
            mask[:, t] = True
            missing -= 1
    return mask


def i2v_mask(frames: int, batch: int = 1) -> torch.Tensor:
    """Image-to-video: the first frame is given, every later frame is generated."""
    return expansion_mask(frames, keep=1, batch=batch)


def expansion_mask(frames: int, keep: int, batch: int = 1) -> torch.Tensor:
    """Video expansion: the first ``keep`` frames are given, the rest are generated."""
    _check_frames(frames)
    if not 1 <= keep <= frames - 1:
        raise ValueError(
            f"expansion keeps between 1 and {frames - 1} of {frames} frames, got {keep}"
        )
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[:, :keep] = True
    return mask


def random_mask(
    frames: int, keep: int, batch: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep ``keep`` frames chosen uniformly at random per sample."""
    _check_frames(frames)
    if not 0 <= keep <= frames - 1:
        raise ValueError(
            f"random masks keep between 0 and {frames - 1} of {frames} frames, got {keep}"
        )
    order = torch.rand(batch, frames, generator=generator).argsort(dim=1)
    return order < keep


def keep_count(frames: int, ratio: float) -> int:
    """Number of frames kept for a keep ``ratio``: at least one, and at least one masked."""
    return max(1, min(frames - 1, math.floor(ratio * frames + 0.5)))


class MaskSampler:
    """Draw masks from a task mixture, with the kept fraction uniform in ``keep`` (min, max)."""

    def __init__(self, tasks: Mapping[str, float], keep: tuple[float, float] = (0.35, 1.0)):
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown mask tasks {sorted(unknown)}; known: {list(TASKS)}")
        total = sum(tasks.values())
        if total <= 0 or any(p < 0 for p in tasks.values()):
            raise ValueError(f"task probabilities must be >= 0 and sum > 0, got {dict(tasks)}")
        self.names = [name for name, p in tasks.items() if p > 0]
        self.probs = torch.tensor([tasks[n] / total for n in self.names], dtype=torch.float64)
        lo, hi = keep
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"keep range must satisfy 0 <= min <= max <= 1, got {keep}")
        self.keep = (lo, hi)

    def sample(
        self, batch: int, frames: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return a ``B T`` bool mask, one task and one keep ratio drawn per sample."""
        _check_frames(frames)
        rows = []
        task_ids = torch.multinomial(self.probs, batch, replacement=True, generator=generator)
        ratios = torch.rand(batch, generator=generator, dtype=torch.float64)
        for task_id, u in zip(task_ids.tolist(), ratios.tolist(), strict=True):
            task = self.names[task_id]
            keep = keep_count(frames, self.keep[0] + u * (self.keep[1] - self.keep[0]))
            if task == "interpolation":
                rows.append(interpolation_mask(frames, keep=max(keep, 2)))
            elif task == "i2v":
                rows.append(i2v_mask(frames))
            elif task == "expansion":
                rows.append(expansion_mask(frames, keep=keep))
            else:
                rows.append(random_mask(frames, keep=keep, generator=generator))
        return torch.cat(rows, dim=0)
