"""The debug model learns: it overfits one real clip, and its first seeded losses are pinned."""

from __future__ import annotations

import math

import pytest
import torch

from mardini.config import ModelConfig
from mardini.masking import MaskSampler, interpolation_mask
from mardini.models import build_model
from mardini.quick_demo import bikes_clip, fit, grid_loss


@pytest.fixture(scope="module")
def clip():
    return bikes_clip(frames=4, size=32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mar", "dm", "joint"])
def test_debug_model_overfits_one_real_clip(clip, kind):
    torch.manual_seed(0)
    model = build_model("debug")
    mask = interpolation_mask(4)
    before = grid_loss(model, clip, mask, kind)
    losses = fit(model, clip, kind, steps=200, lr=2e-3)
    after = grid_loss(model, clip, mask, kind)
    print(
        f"{kind}: held-out grid loss {before:.4f} -> {after:.4f} (train {losses[0]:.4f} -> {losses[-1]:.4f})"
    )
    assert after <= 0.3 * before


# First three losses of the seeded debug joint model under AdamW (lr 1e-3) on the bikes clip.
# They change when the architecture, initialisation, masking or noise draws change: update
# them deliberately (run this test with -s to print the new values) and say why in the commit.
GOLDEN_JOINT = [1.299963, 1.316225, 1.26964]


def test_golden_losses_of_debug_joint(clip):
    torch.manual_seed(1234)
    model = build_model(ModelConfig(preset="debug"))
    masks = MaskSampler({"interpolation": 1.0, "random": 1.0}, keep=(0.25, 0.75))
    losses = fit(model, clip, "joint", steps=3, lr=1e-3, seed=7, masks=masks)
    print("golden joint losses:", [round(x, 6) for x in losses])
    assert losses == pytest.approx(GOLDEN_JOINT, abs=1e-4)


# The learning test: tiny.yaml's dm stage, trained from scratch on the demo's training data (real
# clips of two scenes and synthetic camera motion) for LEARN_STEPS steps at the batch of the
# demo's 2-rank job, must still interpolate the held-out real video (bigbuckbunny, a scene it
# never saw) above the nearest-frame baseline and LEARN_MIN_PSNR. The generator's reference path
# starts as the linear blend of the references (27.60 dB here; nearest frame 25.91), and 200
# steps barely move it (measured: training loss on fixed batches -4.532 -> -4.540; held out
# 27.41-27.57 dB): this guards that training keeps what generalises. Training that does not
# fails it (measured 2026-12-02, before the reference path: a 1200-step joint stage ended 0.6 dB
# below the nearest frame). The threshold leaves 0.9 dB under the measured value, 0.6 dB over
# nearest.
LEARN_STEPS = 200
LEARN_MIN_PSNR = 26.5


@pytest.mark.slow
def test_tiny_dm_stage_generalises_to_held_out_real_video(demo_store):
    from mardini.config import load_config
    from mardini.train.inprocess import evaluate_held_out, train_in_process
    from tests.conftest import CONFIGS

    cfg = load_config(CONFIGS / "tiny.yaml")
    stage = cfg.stage("dm")
    trained = train_in_process(cfg, stage, demo_store, steps=LEARN_STEPS, ranks=2)
    metrics = evaluate_held_out(cfg, stage, trained.model, demo_store, clips=32)
    print(
        f"dm after {LEARN_STEPS} steps ({trained.seconds:.0f} s): held-out interp "
        f"{metrics['interp_psnr']:.2f} dB (x0 estimate {metrics['interp_x0_psnr']:.2f}), nearest "
        f"{metrics['baseline_nearest_interp_psnr']:.2f}, blend "
        f"{metrics['baseline_blend_interp_psnr']:.2f}; i2v {metrics['i2v_psnr']:.2f} "
        f"(nearest {metrics['baseline_nearest_i2v_psnr']:.2f})"
    )
    assert all(math.isfinite(loss) for loss in trained.losses)
    assert metrics["interp_psnr"] > LEARN_MIN_PSNR
    assert metrics["interp_psnr"] > metrics["baseline_nearest_interp_psnr"]
