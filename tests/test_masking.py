"""Frame masks: each task keeps the right frames; the sampler honours mixture and ratios."""

from __future__ import annotations

import pytest
import torch

from mardini.masking import (
    MaskSampler,
    expansion_mask,
    i2v_mask,
    interpolation_mask,
    keep_count,
    random_mask,
)


def test_interpolation_keeps_first_and_last():
    m = interpolation_mask(9, batch=3)
    assert m.shape == (3, 9) and m.dtype == torch.bool
    assert m[:, 0].all() and m[:, -1].all() and not m[:, 1:-1].any()
    m = interpolation_mask(9, keep=3)
    assert m[0].tolist() == [True, False, False, False, True, False, False, False, True]


def test_i2v_and_expansion():
    assert i2v_mask(5)[0].tolist() == [True, False, False, False, False]
    assert expansion_mask(5, keep=3)[0].tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="between 1 and 4"):
        expansion_mask(5, keep=5)


def test_random_mask_counts():
    g = torch.Generator().manual_seed(0)
    m = random_mask(17, keep=5, batch=64, generator=g)
    assert (m.sum(1) == 5).all()
    assert len({tuple(r.tolist()) for r in m}) > 1  # not the same mask every time


@pytest.mark.parametrize("frames", [2, 4, 9, 17])
def test_keep_count_always_masks_one(frames):
    for ratio in (0.0, 0.06, 0.35, 0.65, 1.0):
        k = keep_count(frames, ratio)
        assert 1 <= k <= frames - 1


def test_sampler_mixture_and_ratio_range():
    g = torch.Generator().manual_seed(0)
    sampler = MaskSampler({"interpolation": 1.0, "i2v": 1.0}, keep=(0.3, 0.6))
    m = sampler.sample(400, 9, generator=g)
    i2v = (m.sum(1) == 1) & m[:, 0]
    interp = m[:, 0] & m[:, -1]
    assert (i2v | interp).all()
    assert 0.4 < i2v.float().mean() < 0.6
    kept = m[interp].sum(1)
    assert kept.min() >= keep_count(9, 0.3) and kept.max() <= keep_count(9, 0.6)
    assert not m.all(1).any()


def test_sampler_is_deterministic_and_rejects_bad_tasks():
    s = MaskSampler({"random": 1.0, "expansion": 1.0}, keep=(0.06, 0.3))
    a = s.sample(16, 17, generator=torch.Generator().manual_seed(3))
    b = s.sample(16, 17, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown mask tasks"):
        MaskSampler({"outpaint": 1.0})
