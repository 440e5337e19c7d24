"""Every attention path (SDPA, flex + BlockMask, torch.compile, bf16 autocast) computes the same
Identity Attention as the reference: SDPA with the dense ``identity_mask``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import mardini.models.attention as attention_mod
from mardini.config import ModelConfig
from mardini.masking import i2v_mask, interpolation_mask
from mardini.models import build_model
from mardini.models.attention import (
    Attention,
    compile_blocks,
    identity_block_mask,
    set_attention_backend,
)

# Eager flex on CPU warns that it is unfused; that is the point of testing it here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FRAMES = 4
# B=2 frame masks: i2v / interpolation, nothing masked in one sample, all masked, mixed.
FRAME_MASKS = {
    "i2v+interp": torch.tensor([[True, False, False, False], [True, False, False, True]]),
    "all-ref+mixed": torch.tensor([[True, True, True, True], [False, True, False, True]]),
    "all-masked": torch.tensor([[False] * 4, [False] * 4]),
    "all-ref": torch.tensor([[True] * 4, [True] * 4]),
}


def _reference(attn: Attention, x_BLD, grouping, is_ref_BL, angles=None):
    """The reference path: SDPA with the dense mask, whatever the module's backend."""
    backend, attn.backend = attn.backend, "sdpa"
    try:
        return attn(x_BLD, FRAMES, grouping, angles, is_ref_BL)
    finally:
        attn.backend = backend


def _spy(monkeypatch, name: str) -> list:
    """Count calls of a module-level function of the attention module."""
    calls, real = [], getattr(attention_mod, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_mod, name, wrapper)
    return calls


# ------------------------------------------------------------------ BlockMask


@pytest.mark.parametrize("tokens_per_frame,block", [(8, 8), (6, 8), (8, 16), (12, 5)])
@pytest.mark.parametrize("mask", list(FRAME_MASKS))
def test_block_mask_equals_create_block_mask(tokens_per_frame, block, mask):
    """Built from per-tile counts, it is the BlockMask torch derives from the dense mask."""
    is_ref = FRAME_MASKS[mask].repeat_interleave(tokens_per_frame, dim=1)
    s = is_ref.shape[1]
    ours = identity_block_mask(is_ref, block)
    theirs = create_block_mask(
        lambda b, h, q, k: ~is_ref[b, q] | is_ref[b, k], 2, 1, s, s, "cpu", BLOCK_SIZE=block
    )
    for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert ours.seq_lengths == (s, s)


def test_block_mask_skips_reference_query_tiles_on_masked_keys():
    """Frame-aligned tiles: a reference frame's queries never visit a masked frame's keys."""
    is_ref = torch.tensor([[True, False, True, False]]).repeat_interleave(8, dim=1)
    bm = identity_block_mask(is_ref, 8)
    dense_partial = torch.zeros(4, 4, dtype=torch.bool)
    dense_full = torch.zeros(4, 4, dtype=torch.bool)
    for q in range(4):
        dense_partial[q, bm.kv_indices[0, 0, q, : bm.kv_num_blocks[0, 0, q]].long()] = True
        dense_full[q, bm.full_kv_indices[0, 0, q, : bm.full_kv_num_blocks[0, 0, q]].long()] = True
    frame_ref = torch.tensor([True, False, True, False])
    want_full = ~frame_ref[:, None] | frame_ref[None, :]
    assert torch.equal(dense_full, want_full)
    assert not dense_partial.any()


# ------------------------------------------------------------------ module paths


@pytest.mark.parametrize("grouping", ["spatial", "temporal", "full"])
@pytest.mark.parametrize("mask", list(FRAME_MASKS))
def test_flex_backend_equals_reference(monkeypatch, grouping, mask):
    """The flex backend's output matches the dense-mask SDPA reference (forward: CPU flex has
    no backward in torch 2.13; gradients are checked on GPU)."""
    torch.manual_seed(0)
    attn = Attention(32, 4, backend="flex")
    attn.flex_block_size = 4  # temporal groups are 4 frames: flex runs for every grouping
    n = 6
    is_ref = FRAME_MASKS[mask].repeat_interleave(n, dim=1)
    x = torch.randn(2, FRAMES * n, 32)
    flex_calls = _spy(monkeypatch, "flex_identity_attention")
    with torch.no_grad():
        out = attn(x, FRAMES, grouping, is_ref_BL=is_ref)
        want = _reference(attn, x, grouping, is_ref)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # Flex runs exactly where Identity Attention masks something: groups that mix reference
    # and masked tokens (a spatial group is one frame, so it never does).
    mixed = mask in ("i2v+interp", "all-ref+mixed") and grouping != "spatial"
    assert len(flex_calls) == int(mixed)  # the reference runs SDPA


def test_flex_backend_trains_on_cpu_through_the_dense_mask(monkeypatch):
    """Where gradients are needed on CPU, flex hands over to SDPA: same values, same grads."""
    torch.manual_seed(0)
    attn = Attention(32, 4, backend="flex")
    attn.flex_block_size = 8
    is_ref = FRAME_MASKS["i2v+interp"].repeat_interleave(8, dim=1)
    x = torch.randn(2, 32, 32, requires_grad=True)
    flex_calls = _spy(monkeypatch, "flex_identity_attention")
    out = attn(x, FRAMES, "full", is_ref_BL=is_ref)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert flex_calls == []
    with torch.no_grad():
        torch.testing.assert_close(out, attn(x, FRAMES, "full", is_ref_BL=is_ref))
    assert len(flex_calls) == 1
    want = _reference(attn, x, "full", is_ref)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(grad, want_grad)


def test_groups_shorter_than_a_tile_keep_the_dense_mask(monkeypatch):
    attn = Attention(32, 4, backend="flex")  # 128-token tiles: 4-frame temporal groups are short
    is_ref = FRAME_MASKS["i2v+interp"].repeat_interleave(6, dim=1)
    flex_calls, dense_calls = (
        _spy(monkeypatch, "flex_identity_attention"),
        _spy(monkeypatch, "identity_mask"),
    )
    attn(torch.randn(2, 24, 32), FRAMES, "temporal", is_ref_BL=is_ref)
    assert (len(flex_calls), len(dense_calls)) == (0, 1)


@pytest.mark.parametrize(
    "mask,grouping,needs_mask",
    [
        ("all-ref", "full", False),
        ("all-masked", "full", False),
        ("i2v+interp", "spatial", False),  # each frame alone: every group is all-one-kind
        ("i2v+interp", "full", True),
        ("i2v+interp", "temporal", True),
    ],
)
def test_sdpa_passes_no_mask_where_identity_attention_masks_nothing(
    monkeypatch, mask, grouping, needs_mask
):
    """No mask lets SDPA pick its fused kernels; the result is the masked one all the same."""
    torch.manual_seed(0)
    attn = Attention(32, 4)
    is_ref = FRAME_MASKS[mask].repeat_interleave(6, dim=1)
    x = torch.randn(2, 24, 32)
    dense_calls = _spy(monkeypatch, "identity_mask")
    out = attn(x, FRAMES, grouping, is_ref_BL=is_ref)
    assert len(dense_calls) == int(needs_mask)
    monkeypatch.setattr(attention_mod, "_masks_anything", lambda is_ref_GS: True)
    torch.testing.assert_close(out, attn(x, FRAMES, grouping, is_ref_BL=is_ref))
    assert len(dense_calls) == int(needs_mask) + 1


def test_unknown_backend_is_explained():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        Attention(32, 4, backend="xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(Attention(32, 4), "xformers")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_bf16_autocast(backend):
    """Under bf16 autocast both kernels run (q, k, v share a dtype) and stay near fp32."""
    torch.manual_seed(0)
    attn = Attention(64, 4, backend=backend)
    attn.flex_block_size = 8
    is_ref = FRAME_MASKS["i2v+interp"].repeat_interleave(8, dim=1)
    x = torch.randn(2, 32, 64)
    angles = attention_mod.RotaryEmbedding3D(16)(FRAMES, 2, 4)
    with torch.no_grad():  # CPU flex is forward only
        want = attn(x, FRAMES, "full", angles, is_ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, FRAMES, "full", angles, is_ref)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------ whole model


def test_model_with_flex_backend_equals_reference(monkeypatch):
    """MarDini's loss and samples are the same with every Attention on flex."""
    torch.manual_seed(0)
    ref_model = build_model(ModelConfig(preset="debug", cfg_dropout=0.0)).eval()
    flex_model = build_model(ModelConfig(preset="debug", cfg_dropout=0.0)).eval()
    flex_model.load_state_dict(ref_model.state_dict())
    assert set_attention_backend(flex_model, "flex", flex_block_size=16) == 2 * 2 + 2 * 3
    video, mask = torch.rand(2, 5, 3, 32, 32) * 2 - 1, interpolation_mask(5, batch=2)
    flex_calls = _spy(monkeypatch, "flex_identity_attention")
    with torch.no_grad():
        losses = [
            m(video, mask, "joint", torch.Generator().manual_seed(1), torch.tensor([0.3, 0.8]))
            for m in (ref_model, flex_model)
        ]
    torch.testing.assert_close(losses[1]["loss"], losses[0]["loss"], atol=1e-5, rtol=1e-5)
    assert len(flex_calls) == 2 + 2  # the planner's and the generator's spatio-temporal layers

    mask = i2v_mask(5, batch=1)
    samples = [
        m.sample(video[:1], mask, steps=2, generator=torch.Generator().manual_seed(2))
        for m in (ref_model, flex_model)
    ]
    torch.testing.assert_close(samples[1], samples[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_inductor_compiled_attention_equals_reference(backend):
    """Inductor's fused kernels (C++ on CPU; flex honours the BlockMask's tiles only here)."""
    torch.manual_seed(0)
    attn = Attention(32, 2, backend=backend)
    # 16-token frames and tiles (inductor's CPU flex kernel needs tiles >= 16): full, empty
    # and partial tiles all occur.
    attn.flex_block_size = 16
    compiled = torch.compile(attn)
    angles = attention_mod.RotaryEmbedding3D(16)(FRAMES, 4, 4)
    x = torch.randn(2, 64, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mask in ("i2v+interp", "all-ref+mixed"):
            # Misaligned frames too: sample 0's frames shifted by half a tile.
            is_ref = FRAME_MASKS[mask].repeat_interleave(16, dim=1)
            is_ref[0] = torch.roll(is_ref[0], 8)
            out = compiled(x, FRAMES, "full", angles, is_ref)
            want = _reference(attn, x, "full", is_ref, angles)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_blocks_keeps_loss_and_gradients():
    """compile_blocks compiles all 4 blocks of the debug model in place: same loss and grads.

    Traced by dynamo and AOT autograd (``aot_eager``): inductor's code generation for the whole
    model takes over a minute on two cores; its kernels are checked on one module above.
    """
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug", cfg_dropout=0.0))
    video, mask = torch.rand(2, 5, 3, 32, 32) * 2 - 1, interpolation_mask(5, batch=2)
    t_B = torch.tensor([0.3, 0.8])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(video, mask, kind="joint", generator=torch.Generator().manual_seed(1), t_B=t_B)
        loss["loss"].backward()
        return loss["loss"].detach(), [
            p.grad.clone() for p in model.parameters() if p.grad is not None
        ]

    want_loss, want_grads = loss_and_grads()
    keys = list(model.state_dict())
    assert compile_blocks(model, backend="aot_eager") == 4
    assert list(model.state_dict()) == keys  # checkpoints stay loadable
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_on_cuda_equals_sdpa_at_paper_token_counts(dtype):
    """The compiled flex kernel (128-token tiles) against SDPA, 9 frames of 256 tokens: output
    and gradients."""
    torch.manual_seed(0)
    attn = Attention(1024, 16, backend="flex").cuda()
    frames, n = 9, 256
    frame_mask = torch.tensor([[True] + [False] * 7 + [True], [True] + [False] * 8]).cuda()
    is_ref = frame_mask.repeat_interleave(n, dim=1)
    angles = attention_mod.RotaryEmbedding3D(64)(frames, 16, 16, device="cuda")
    x = torch.randn(2, frames * n, 1024, device="cuda", requires_grad=True)
    results = []
    for backend in ("flex", "sdpa"):
        attn.backend = backend
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = attn(x, frames, "full", angles, is_ref)
        (grad,) = torch.autograd.grad(out.float().square().mean(), x)
        results.append((out.float(), grad))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_identity_attention_holds_on_cuda_in_bf16(backend):
    """On the GPU kernels (compiled flex with 128-token tiles, or SDPA's masked kernel), in
    bf16: changing the masked frames' tokens leaves every reference token's output unchanged,
    and does change the masked tokens' outputs (the control)."""
    torch.manual_seed(0)
    frames, n, width = 9, 256, 1024
    attn = Attention(width, 16, backend=backend).cuda()
    frame_mask = torch.tensor([[True] + [False] * 7 + [True], [True, True] + [False] * 7]).cuda()
    is_ref = frame_mask.repeat_interleave(n, dim=1)
    angles = attention_mod.RotaryEmbedding3D(64)(frames, 16, 16, device="cuda")
    x = torch.randn(2, frames * n, width, device="cuda")
    other = torch.where(is_ref[..., None], x, torch.randn_like(x))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out_a, out_b = (attn(v, frames, "full", angles, is_ref) for v in (x, other))
    assert torch.equal(out_a[is_ref], out_b[is_ref]), "a reference token saw the masked frames"
    assert (out_a[~is_ref] - out_b[~is_ref]).abs().max() > 1e-2


@pytest.mark.gpu
def test_model_trains_and_samples_on_cuda_with_flex_as_with_sdpa():
    """The debug model on the GPU at 64 px (256 tokens a frame: the flex kernel runs in every
    spatial and spatio-temporal layer), bf16 autocast: flex and SDPA give the same loss and
    gradients, and a sample keeps its reference frames and is finite."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug", cfg_dropout=0.0)).cuda()
    video = (torch.rand(2, 5, 3, 64, 64) * 2 - 1).cuda()
    mask = interpolation_mask(5, batch=2).cuda()
    t_B = torch.tensor([0.3, 0.8], device="cuda")
    results = []
    for backend in ("flex", "sdpa"):
        assert set_attention_backend(model, backend) > 0
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(video, mask, "joint", torch.Generator("cuda").manual_seed(1), t_B)["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach().float(), grads.float()))
    (loss_flex, grad_flex), (loss_sdpa, grad_sdpa) = results
    assert torch.isfinite(loss_flex) and torch.isfinite(grad_flex).all()
    torch.testing.assert_close(loss_flex, loss_sdpa, atol=2e-2, rtol=2e-2)
    rel = (grad_flex - grad_sdpa).norm() / grad_sdpa.norm()
    assert rel < 5e-2, f"flex and SDPA gradients differ by {rel:.3g} (relative)"
    set_attention_backend(model, "flex")
    model, video = model.eval().to(torch.bfloat16), video.to(torch.bfloat16)
    clip = model.sample(video, mask, steps=3, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(clip).all()
    keep = mask[..., None, None, None].expand_as(clip)
    assert torch.equal(clip[keep], video[keep])


def test_config_switches_reach_every_block():
    """``attention_backend`` and ``compile`` in the model config: build_model sets the backend
    on every Attention and compiles every block; the loss is the reference loss."""
    torch.manual_seed(0)
    ref = build_model(ModelConfig(preset="debug", cfg_dropout=0.0))
    fast = build_model(
        ModelConfig(
            preset="debug",
            cfg_dropout=0.0,
            attention_backend="flex",
            compile=True,
            compile_backend="aot_eager",
        )
    )
    fast.load_state_dict(ref.state_dict())
    attns = [m for m in fast.modules() if isinstance(m, Attention)]
    assert attns and {m.backend for m in attns} == {"flex"}
    blocks = [b for m in fast.modules() for b in getattr(m, "blocks", [])]
    assert len(blocks) == 4 and all(b._compiled_call_impl is not None for b in blocks)
    video, mask = torch.rand(2, 5, 3, 32, 32) * 2 - 1, interpolation_mask(5, batch=2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [
            m(video, mask, "joint", torch.Generator().manual_seed(1), torch.tensor([0.3, 0.8]))
            for m in (ref, fast)
        ]
    torch.testing.assert_close(losses[1]["loss"], losses[0]["loss"], atol=1e-5, rtol=1e-5)
