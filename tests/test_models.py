"""MarDini architecture: shapes, Identity Attention, parameter counts, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mardini.config import ModelConfig
from mardini.masking import expansion_mask, i2v_mask, interpolation_mask, random_mask
from mardini.models import KINDS, PRESETS, build_model
from mardini.models.generator import blend_weights, motion_search, neighbour_references

SIZE = {"debug": 32, "tiny": 32}
MASKS = {
    "interpolation": lambda t: interpolation_mask(t, batch=2),
    "i2v": lambda t: i2v_mask(t, batch=2),
    "expansion": lambda t: expansion_mask(t, keep=2, batch=2),
    "random": lambda t: random_mask(t, keep=2, batch=2, generator=torch.Generator().manual_seed(0)),
}


def _perturbed(model):
    """Nudge every weight: zero-initialised output layers (DiT/MAR style) block gradients to
    everything upstream on the very first step; a trained model has no such zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: _perturbed(build_model(name)) for name in SIZE}


def _video(size, frames=5, batch=2):
    return torch.rand(batch, frames, 3, size, size) * 2 - 1


@pytest.mark.parametrize("preset", list(SIZE))
@pytest.mark.parametrize("task", list(MASKS))
@pytest.mark.parametrize("kind", KINDS)
def test_loss_shapes_and_gradients(models, preset, task, kind):
    model = models[preset]
    video, mask = _video(SIZE[preset]), MASKS[task](5)
    model.zero_grad(set_to_none=True)
    out = model(video, mask, kind=kind)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    out["loss"].backward()
    touched = {
        name.split(".")[0]
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    expected = {
        "mar": {"planner", "planner_head"},
        "dm": {"generator"},
        "joint": {"planner", "generator"},
    }[kind]
    assert touched == expected, f"{kind}: gradients reached {touched}"


@pytest.mark.parametrize("preset", list(SIZE))
def test_planning_signal_and_generator_shapes(models, preset):
    model = models[preset]
    cfg = model.cfg
    video, mask = _video(SIZE[preset], frames=3), interpolation_mask(3, batch=2)
    hi, lo = model.encode(video)
    assert hi.shape == (2, 3, 3, SIZE[preset], SIZE[preset])
    assert lo.shape[-1] == SIZE[preset] // cfg.planner_downscale
    plan = model.planner(lo, mask)
    n = (lo.shape[-1] // cfg.planner.patch) ** 2
    assert plan.shape == (2, 3, n, cfg.planner.width)
    v = model.generator(hi, torch.rand(2, 3), mask, plan)
    assert v.shape == hi.shape


def test_bad_video_sizes_are_explained(models):
    with pytest.raises(ValueError, match="multiples of 8"):
        models["debug"](torch.zeros(1, 3, 3, 20, 20), interpolation_mask(3))
    with pytest.raises(ValueError, match="B T 3 H W"):
        models["debug"](torch.zeros(3, 3, 32, 32), interpolation_mask(3))
    with pytest.raises(ValueError, match="at least one masked frame"):
        models["debug"](torch.zeros(1, 3, 3, 32, 32), torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------ Identity Attention


def _capture_block_outputs(module_list):
    outputs, hooks = [], []
    for block in module_list:
        hooks.append(
            block.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
        )
    return outputs, hooks


@pytest.mark.parametrize(
    "reference_path",
    [False, True, "motion", "search"],
    ids=["attention", "reference_path", "motion", "search"],
)
@pytest.mark.parametrize("attention", ["temporal", "spatiotemporal"])
def test_identity_attention_in_generator(attention, reference_path):
    torch.manual_seed(0)
    # Perturbed: non-zero modulation and outputs, so every sublayer actually contributes.
    cfg = ModelConfig(
        preset="debug",
        cfg_dropout=0.0,
        prediction="x0" if reference_path else "velocity",
        generator={
            "reference_path": bool(reference_path),
            "reference_motion": reference_path == "motion",
            "reference_search": 2 if reference_path == "search" else 0,
        },
    )
    model = _perturbed(build_model(cfg)).eval()
    frames, size = 5, 32
    mask = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    is_ref = mask.repeat_interleave((size // model.cfg.generator.patch) ** 2, dim=1)
    video = _video(size, frames)
    hi, lo = model.encode(video)
    plan = model.planner(lo, mask)
    t_BT = torch.where(mask, 0.0, 0.7)
    x_t = torch.where(mask[..., None, None, None], hi, torch.randn_like(hi))
    x_t2 = torch.where(mask[..., None, None, None], hi, torch.randn_like(hi))  # other noise

    runs = []
    for x in (x_t, x_t2):
        outputs, hooks = _capture_block_outputs(model.generator.blocks)
        with torch.no_grad():
            final = model.generator(x, t_BT, mask, plan, attention)
        for h in hooks:
            h.remove()
        runs.append((outputs, final))
    for out_a, out_b in zip(runs[0][0], runs[1][0], strict=True):
        ref_diff = (out_a - out_b)[is_ref].abs().max().item()
        noised_diff = (out_a - out_b)[~is_ref].abs().max().item()
        assert ref_diff <= 1e-6, f"a reference token changed by {ref_diff}"
        assert noised_diff > 1e-3, "control: noised tokens must change when their input changes"
    ref_frames = mask[..., None, None, None].expand_as(hi)
    assert (runs[0][1] - runs[1][1])[ref_frames].abs().max().item() <= 1e-6


def test_identity_attention_in_planner():
    torch.manual_seed(0)
    model = build_model("debug").eval()
    mask = torch.tensor([[True, False, True, False]])
    video = _video(32, 4, batch=1)
    other = video.clone()
    other[:, 1] = torch.rand_like(other[:, 1])  # masked frames' content never matters ...
    other[:, 3] = -other[:, 3]
    _, lo = model.encode(video)
    _, lo2 = model.encode(other)
    with torch.no_grad():
        assert torch.equal(model.planner(lo, mask), model.planner(lo2, mask))
        plan_a = model.planner(lo, mask)
        # What stands in the masked frames (the [MASK] embedding) reaches only masked tokens.
        model.planner.mask_token.add_(1.0)
        plan_b = model.planner(lo, mask)
    assert (plan_a[:, [0, 2]] - plan_b[:, [0, 2]]).abs().max() <= 1e-6
    assert (plan_a[:, [1, 3]] - plan_b[:, [1, 3]]).abs().max() > 1e-3


def test_without_the_mask_references_would_change():
    """Control for the Identity Attention test: plain attention leaks noise into references."""
    from mardini.models.attention import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 3:] = torch.randn(1, 3, 32)
    is_ref = torch.tensor([[True] * 3 + [False] * 3])
    with torch.no_grad():
        plain = (attn(x, 2, "full") - attn(y, 2, "full"))[:, :3].abs().max()
        masked = (
            (attn(x, 2, "full", is_ref_BL=is_ref) - attn(y, 2, "full", is_ref_BL=is_ref))[:, :3]
            .abs()
            .max()
        )
    assert plain > 1e-3 and masked <= 1e-6


# ------------------------------------------------------------------ sizes


def _count(preset):
    with torch.device("meta"):
        return build_model(preset).num_params()


def test_paper_parameter_counts():
    counts = _count("paper")
    assert counts["planner"] == pytest.approx(3.1e9, rel=0.05)
    assert counts["generator"] == pytest.approx(288e6, rel=0.05)
    assert _count("paper-1b")["generator"] == pytest.approx(1.0e9, rel=0.05)
    assert _count("paper-s")["planner"] == pytest.approx(1.3e9, rel=0.05)


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        with torch.device("meta"):
            model = build_model(name)
        assert all(p.is_meta for p in model.parameters())


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("kind", ["dm", "joint"])
@pytest.mark.parametrize("solver,cfg_scale", [("euler", 1.0), ("heun", 2.5)])
def test_sample_is_deterministic_and_keeps_references(models, kind, solver, cfg_scale):
    model = models["debug"].eval()
    video = _video(32, frames=5, batch=2)
    mask = interpolation_mask(5, batch=2)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.sample(
            video, mask, steps=4, solver=solver, cfg_scale=cfg_scale, kind=kind, generator=g
        )

    a, b, c = run(1), run(1), run(2)
    assert a.shape == video.shape
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 1:-1], c[:, 1:-1])
    assert torch.equal(a[mask], video[mask])
    assert a.min() >= -1 and a.max() <= 1


def test_sample_ignores_masked_frame_content(models):
    model = models["debug"].eval()
    video = _video(32, frames=4, batch=1)
    other = video.clone()
    other[:, 1:3] = 0.5
    mask = interpolation_mask(4)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.sample(video, mask, steps=2, generator=g())
    b = model.sample(other, mask, steps=2, generator=g())
    assert torch.equal(a[:, 1:3], b[:, 1:3])


def test_neighbour_references_are_the_nearest_reference_on_each_side():
    frames = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 1, 2, 2) + 1  # frame i is i + 1
    mask = torch.tensor([[False, True, False, False, True, False]])
    before, after, d_before, d_after = neighbour_references(frames, mask)
    # Frame values of the reference before / after each frame (0: there is none).
    assert before[0, :, 0, 0, 0].tolist() == [0, 2, 2, 2, 5, 5]
    assert after[0, :, 0, 0, 0].tolist() == [2, 2, 5, 5, 5, 0]
    # Distances in clip lengths; 1 where there is no reference on that side; 0 on a reference.
    torch.testing.assert_close(d_before[0], torch.tensor([6, 0, 1, 2, 0, 1]) / 6)
    torch.testing.assert_close(d_after[0], torch.tensor([1, 0, 2, 1, 0, 6]) / 6)


@pytest.mark.parametrize(
    "motion, search", [(False, 0), (True, 0), (False, 2)], ids=["blend", "motion", "search"]
)
def test_untrained_reference_path_predicts_the_linear_blend_and_needs_x0(motion, search):
    torch.manual_seed(0)
    generator = {"reference_path": True, "reference_motion": motion, "reference_search": search}
    cfg = ModelConfig(preset="debug", prediction="x0", generator=generator)
    model = build_model(cfg)
    # Interpolation (frames 0 and 4 given) and image-to-video (frame 0 given).
    mask = torch.tensor([[True, False, False, False, True], [True, False, False, False, False]])
    hi, _ = model.encode(_video(32, 5))
    x_t = torch.where(mask[..., None, None, None], hi, torch.randn_like(hi))
    with torch.no_grad():
        out = model.generator(x_t, torch.where(mask, 0.0, 1.0), mask)
    # Zero-initialised corrections: the x0 prediction is the blend, or a copy of the one reference.
    for k in range(1, 4):
        torch.testing.assert_close(out[0, k], (1 - k / 4) * hi[0, 0] + k / 4 * hi[0, 4])
        torch.testing.assert_close(out[1, k], hi[1, 0])
    with pytest.raises(ValueError, match="prediction: x0"):
        ModelConfig(preset="debug", generator={"reference_path": True})
    with pytest.raises(ValueError, match="reference_path: true"):
        ModelConfig(preset="debug", prediction="x0", generator={"reference_motion": True})
    with pytest.raises(ValueError, match="reference_path: true"):
        ModelConfig(preset="debug", prediction="x0", generator={"reference_search": 2})


def test_motion_search_finds_a_translation_the_blend_doubles():
    """A smooth scene sliding 1 px per frame: between its first and last frame, the searched
    candidate is close to the true frames where the blend is a double exposure; frames with
    one reference get a copy of it, and reference frames and one-sided frames read 0 clarity."""
    torch.manual_seed(0)
    scene = F.interpolate(torch.rand(1, 3, 12, 12) * 2 - 1, size=(48, 48), mode="bicubic")
    video = torch.stack([scene[..., 8:40, 8 + k : 40 + k] for k in range(5)], dim=1)  # B T C H W
    mask = torch.tensor([[True, False, False, False, True]])
    before, after, d_before, d_after = neighbour_references(video, mask)
    searched, clarity = motion_search(before, after, d_before, d_after, radius=4)
    w_before, w_after = (w[..., None, None, None] for w in blend_weights(d_before, d_after))
    blend = w_before * before + w_after * after

    def error(frames):
        return (frames - video)[0, 1:4].pow(2).mean().item()

    # Not exact: sub-pixel fetches are bilinear, and content entering at the edge is unknown.
    assert error(searched) < error(blend) / 5, (error(searched), error(blend))
    assert (clarity[0, 1:4].mean((1, 2, 3)) > 1).all()
    assert clarity[0, [0, 4]].abs().max() == 0

    image_to_video = torch.tensor([[True, False, False, False, False]])
    refs = neighbour_references(video, image_to_video)
    searched, clarity = motion_search(*refs, radius=4)
    torch.testing.assert_close(searched, video[:, :1].expand_as(video))
    assert clarity.abs().max() == 0


def test_reference_motion_moves_the_references_along_the_predicted_field():
    """A constant motion field of k pixels fetches each reference from k pixels away."""
    cfg = ModelConfig(
        preset="debug",
        prediction="x0",
        generator={"reference_path": True, "reference_motion": True},
    )
    path = build_model(cfg).generator.references
    b, t, c, h, w = 1, 3, 3, 16, 16
    before, after = torch.rand(b, t, c, h, w), torch.rand(b, t, c, h, w)
    hidden = torch.randn(b, t, (h // path.patch) * (w // path.patch), path.motion.in_features)
    with torch.no_grad():
        path.motion.weight.zero_()
        # Before: 2 px to the right (dx = +2); after: 2 px down (dy = +2), in pixels / gain.
        path.motion.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 2.0]) / path.MOTION_GAIN)
        moved_before, moved_after = path.warp(before, after, hidden)
    torch.testing.assert_close(moved_before[..., :, :-2], before[..., :, 2:])
    torch.testing.assert_close(moved_after[..., :-2, :], after[..., 2:, :])
    # Border padding: what lies beyond the frame repeats its edge.
    torch.testing.assert_close(moved_before[..., :, -1], before[..., :, -1])


def test_x0_prediction_samples_through_the_velocity_it_implies():
    torch.manual_seed(0)
    model = _perturbed(build_model(ModelConfig(preset="debug", prediction="x0"))).eval()
    video, mask = _video(32, 4, batch=1), interpolation_mask(4, batch=1)
    hi, _ = model.encode(video)
    x_t = torch.where(mask[..., None, None, None], hi, torch.randn_like(hi))
    t_BT = torch.where(mask, 0.0, 0.6)
    with torch.no_grad():
        x0 = model.generator(x_t, t_BT, mask)
        v = model.velocity(x_t, t_BT, mask)
    masked = ~mask[..., None, None, None].expand_as(hi)
    torch.testing.assert_close(model.schedule.split(x_t, v, t_BT)[0][masked], x0[masked])
    out = model.sample(video, mask, kind="dm", steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, [0, 3]], video[:, [0, 3]])


def test_input_perturbation_moves_training_inputs_off_the_path_and_only_in_training():
    """``input_perturbation: g`` noises the training input with ``eps + g xi`` but keeps the
    target: the loss changes in training mode; in evaluation mode (held-out loss) it does not."""
    torch.manual_seed(0)
    video, mask = _video(32, 4, batch=2), interpolation_mask(4, batch=2)
    t_B = torch.tensor([0.5, 0.8])

    def loss(perturbation: float, training: bool) -> float:
        cfg = ModelConfig(preset="debug", prediction="x0", input_perturbation=perturbation)
        torch.manual_seed(1)
        model = _perturbed(build_model(cfg)).train(training)
        gen = torch.Generator().manual_seed(2)
        return model(video, mask, kind="dm", generator=gen, t_B=t_B)["loss"].item()

    assert loss(0.1, training=True) != pytest.approx(loss(0.0, training=True), rel=1e-4)
    assert loss(0.1, training=False) == loss(0.0, training=False)
