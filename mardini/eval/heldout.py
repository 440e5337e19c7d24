"""Held-out diffusion loss on a fixed timestep grid with fixed noise seeds.

Every checkpoint sees the same clips, the same frame masks, the same diffusion times and the
same noise, so the number is comparable across checkpoints and stages of one kind (it is the
training objective of that kind, evaluated without guidance dropout).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mardini.masking import i2v_mask, interpolation_mask
from mardini.models import MarDini

GRID = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def grid_loss(
    model: MarDini,
    video: torch.Tensor,
    frame_mask: torch.Tensor,
    kind: str,
    times: Sequence[float] = GRID,
    seed: int = 0,
) -> float:
    """Mean loss over a fixed timestep grid with fixed noise: comparable across checkpoints."""
    was_training = model.training
    model.eval()
    losses = []
    device = video.device
    for i, t in enumerate(times):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        t_B = torch.full((video.shape[0],), float(t), device=device)
        losses.append(
            model(video, frame_mask.to(device), kind=kind, generator=gen, t_B=t_B)["loss"].item()
        )
    model.train(was_training)
    return sum(losses) / len(losses)


def eval_masks(frames: int, batch: int) -> dict[str, torch.Tensor]:
    """The fixed masks of the held-out loss: interpolation (ends kept) and image-to-video."""
    return {"interpolation": interpolation_mask(frames, batch), "i2v": i2v_mask(frames, batch)}


def batch_heldout_loss(
    model: MarDini,
    video: torch.Tensor,
    kind: str,
    index: int,
    times: Sequence[float] = GRID,
    seed: int = 0,
) -> float:
    """Mean ``grid_loss`` of batch number ``index`` (``B T 3 H W``) over the fixed masks."""
    b, frames = video.shape[:2]
    losses = [
        # Seeds differ per batch and mask, never per checkpoint: the noise is part of the test.
        grid_loss(model, video, mask, kind, times, seed=seed + 1000 * (2 * index + j))
        for j, mask in enumerate(eval_masks(frames, b).values())
    ]
    return sum(losses) / len(losses)


def heldout_loss(
    model: MarDini,
    batches: Iterable[torch.Tensor],
    kind: str,
    times: Sequence[float] = GRID,
    seed: int = 0,
) -> float:
    """Clip-weighted mean of ``batch_heldout_loss`` over batches ``B T 3 H W``."""
    total, clips = 0.0, 0
    for index, video in enumerate(batches):
        total += video.shape[0] * batch_heldout_loss(model, video, kind, index, times, seed)
        clips += video.shape[0]
    if clips == 0:
        raise ValueError("held-out loss needs at least one clip; the validation split is empty")
    return total / clips
