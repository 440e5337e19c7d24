"""The training loss: mean squared error over masked (generated) frames only."""

from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """MSE over the frames where ``frame_mask`` is False (``pred``/``target``: B T ..., mask: B T).

    Reference frames contribute nothing; the mean is over the elements of masked frames.
    """
    weight = (~frame_mask).to(pred.dtype)
    per_frame = (pred - target).pow(2).flatten(2).mean(dim=2)  # B T
    return (per_frame * weight).sum() / weight.sum().clamp_min(1.0)
