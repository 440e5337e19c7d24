"""Training augmentation: symmetries of the clip (mirror, time, colour order), drawn per clip."""

from __future__ import annotations

import itertools

import torch

from mardini.data.augment import augment_clips, reverse_some


def _variants(clip: torch.Tensor) -> list[torch.Tensor]:
    """Every mirror x time-reversal x channel-order transform of a ``T 3 H W`` clip."""
    out = []
    for mirror, reverse, order in itertools.product(
        (0, 1), (0, 1), itertools.permutations(range(3))
    ):
        c = clip.flip(-1) if mirror else clip
        c = c.flip(0) if reverse else c
        out.append(c[:, list(order)])
    return out


def test_each_clip_becomes_one_of_its_symmetric_variants():
    video = torch.rand(32, 4, 3, 6, 6)
    out = augment_clips(video, torch.Generator().manual_seed(0))
    assert out.shape == video.shape
    changed = 0
    for clip, aug in zip(video, out, strict=True):
        assert any(torch.equal(aug, v) for v in _variants(clip))
        changed += not torch.equal(aug, clip)
    assert 20 <= changed < 32  # each transform has probability 1/2: about 7/8 change
    again = augment_clips(video, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # drawn from the step's generator: a resumed job matches


def test_cached_latents_reverse_both_resolutions_together():
    hi, lo = torch.rand(16, 4, 2, 4, 4), torch.rand(16, 4, 2, 2, 2)
    hi2, lo2 = reverse_some(hi, lo, torch.Generator().manual_seed(0))
    reversed_hi = [torch.equal(a, b.flip(0)) for a, b in zip(hi2, hi, strict=True)]
    reversed_lo = [torch.equal(a, b.flip(0)) for a, b in zip(lo2, lo, strict=True)]
    assert reversed_hi == reversed_lo and 0 < sum(reversed_hi) < 16
