"""The training loss: mean squared error over masked (generated) frames only."""

from __future__ import annotations

import torch

# Added to each clip's MSE before the log: errors below it (about 36 dB PSNR on [-1, 1] data)
# stop counting, so a clip the model already renders well does not pull the loss to -inf.
LOG_FLOOR = 1e-3


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """MSE over the frames where ``frame_mask`` is False (``pred``/``target``: B T ..., mask: B T).

    Reference frames contribute nothing. ``mean``: the mean over the elements of masked frames.
    ``log``: each clip's MSE over its masked frames, then the mean of ``log(mse + LOG_FLOOR)``
    over clips, so every clip's relative error counts (as in a mean PSNR) instead of the clips
    with the largest errors dominating.
    """
    weight = (~frame_mask).to(pred.dtype)
    per_frame = (pred - target).pow(2).flatten(2).mean(dim=2)  # B T
    if reduction == "mean":
        return (per_frame * weight).sum() / weight.sum().clamp_min(1.0)
    if reduction == "log":
        per_clip = (per_frame * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        return torch.log(per_clip + LOG_FLOOR).mean()
    raise ValueError(f"unknown loss reduction {reduction!r}; use 'mean' or 'log'")
