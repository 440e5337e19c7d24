"""Training-time augmentation of clips: mirror, time reversal and colour-channel order.

Each is a symmetry of what the model must learn (frames shared between reference and generated
positions do not care which way the camera pans, in which order the clip plays, or which
channel holds red), so it multiplies a small dataset's variety without inventing content.
Drawn per clip from the step's generator, so a resumed job augments exactly as before.
"""

from __future__ import annotations

import torch


def augment_clips(video_BTCHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each clip mirrored left-right, played backwards and its colour channels permuted, each
    with probability 1/2 (channel order uniformly among the 6 when permuted); ``B T 3 H W``."""
    b, _, c, _, _ = video_BTCHW.shape
    draws = torch.rand(b, 3, generator=generator)
    clips = []
    for i in range(b):
        clip = video_BTCHW[i]
        if draws[i, 0] < 0.5:
            clip = clip.flip(-1)
        if draws[i, 1] < 0.5:
            clip = clip.flip(0)
        if draws[i, 2] < 0.5 and c == 3:
            clip = clip[:, torch.randperm(c, generator=generator)]
        clips.append(clip)
    return torch.stack(clips)


def reverse_some(
    hi_BTCHW: torch.Tensor, lo_BTChw: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latents (both resolutions) played backwards for half the clips: the one
    augmentation a per-frame autoencoder's latents allow exactly."""
    flip = torch.rand(hi_BTCHW.shape[0], generator=generator) < 0.5
    flip_hi = flip.to(hi_BTCHW.device)[:, None, None, None, None]
    flip_lo = flip.to(lo_BTChw.device)[:, None, None, None, None]
    return (
        torch.where(flip_hi, hi_BTCHW.flip(1), hi_BTCHW),
        torch.where(flip_lo, lo_BTChw.flip(1), lo_BTChw),
    )
