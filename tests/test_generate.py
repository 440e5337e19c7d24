"""Generation on a debug checkpoint: every `mardini generate` subcommand, plans, the registry."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mardini import generate as g
from mardini.cli import app
from mardini.export import export_final, load_model
from mardini.models import build_model
from mardini.video import read_video, to_uint8, write_lossless_mp4

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and avoids oversubscribing shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A debug-preset joint checkpoint in the trainer's export format (random weights)."""
    torch.manual_seed(0)
    model = build_model("debug")
    meta = {
        "curriculum": "gen-test",
        "stage": "joint-interpolation",
        "kind": "joint",
        "steps": 0,
        "trained_parts": ["planner", "generator"],
        "model": model.cfg.model_dump(mode="json"),
    }
    return export_final(model.state_dict(), meta, str(tmp_path_factory.mktemp("ckpt") / "stage"))


@pytest.fixture(scope="module")
def images(tmp_path_factory, bikes_path) -> dict[str, tuple]:
    """Two real frames (first and eighth of bikes at 8 fps, 32 px) as PNG files + pixels."""
    tmp = tmp_path_factory.mktemp("images")
    clip = to_uint8(read_video(bikes_path, frames=8, fps=8, size=SIZE))
    out = {}
    for name, index in (("first", 0), ("last", 7)):
        path = tmp / f"{name}.png"
        Image.fromarray(clip[index]).save(path)
        out[name] = (path, clip[index])
    return out


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def _decoded(path) -> np.ndarray:
    return to_uint8(read_video(path))


def _common(checkpoint: str, out) -> list[str]:
    return ["--checkpoint", checkpoint, "--out", str(out), "--steps", "2", "--lossless"]


def test_interpolate_keeps_both_given_frames(checkpoint, images, tmp_path):
    out = tmp_path / "interp.mp4"
    first, last = images["first"], images["last"]
    text = _cli(
        "generate", "interpolate", "--first", str(first[0]), "--last", str(last[0]),
        "--frames", "6", *_common(checkpoint, out),
    )  # fmt: skip
    video = _decoded(out)
    assert video.shape == (6, SIZE, SIZE, 3)
    assert np.array_equal(video[0], first[1]) and np.array_equal(video[-1], last[1])
    assert not np.array_equal(video[2], first[1])  # something was generated in between
    assert "4 generated" in text and "s per generated frame" in text


def test_i2v_keeps_the_image_and_writes_a_gif(checkpoint, images, tmp_path):
    out = tmp_path / "i2v.mp4"
    _cli(
        "generate", "i2v", "--image", str(images["first"][0]), "--frames", "5", "--gif",
        *_common(checkpoint, out),
    )  # fmt: skip
    video = _decoded(out)
    assert video.shape == (5, SIZE, SIZE, 3)
    assert np.array_equal(video[0], images["first"][1])
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == 5 and gif.size == (SIZE, SIZE)


def test_expand_keeps_every_given_frame(checkpoint, bikes_path, tmp_path):
    given = read_video(bikes_path, frames=3, fps=8, size=SIZE)
    source = write_lossless_mp4(tmp_path / "given.mp4", given, fps=8)
    out = tmp_path / "expand.mp4"
    # Window 4: the 4 new frames come in autoregressive chunks of 2, each seeing 2 frames.
    _cli(
        "generate", "expand", "--video", str(source), "--add", "4", "--window", "4",
        *_common(checkpoint, out),
    )  # fmt: skip
    video = _decoded(out)
    assert video.shape == (7, SIZE, SIZE, 3)
    assert np.array_equal(video[:3], to_uint8(given))


def test_long_produces_total_frames_in_a_playable_mp4(checkpoint, images, tmp_path):
    out = tmp_path / "long.mp4"
    text = _cli(
        "generate", "long", "--image", str(images["first"][0]), "--window", "4", "--total", "11",
        "--checkpoint", checkpoint, "--out", str(out), "--steps", "1",
    )  # fmt: skip
    video = read_video(out)  # default: H.264 yuv420p, lossy
    assert video.shape == (11, 3, SIZE, SIZE)
    first = torch.from_numpy(images["first"][1]).permute(2, 0, 1).float() / 127.5 - 1
    assert (video[0] - first).abs().mean() < 0.05
    assert "11 frames" in text


@pytest.mark.parametrize("total,window", [(128, 32), (11, 4), (64, 4), (3, 3), (20, 20)])
def test_long_plan_fills_every_frame_once_within_the_window(total, window):
    keys, levels = g.long_plan(total, window)
    assert keys[0] == 0 and keys[-1] == total - 1 and len(keys) <= window
    known = set(keys)
    for level in levels:
        new = set()
        for positions in level:
            assert len(positions) <= window and positions == sorted(positions)
            assert positions[0] in known and positions[-1] in known  # both ends exist already
            inner = set(positions[1:-1])
            assert not inner & (known | new)
            new |= inner
        known |= new
    assert known == set(range(total))
    if (total, window) == (128, 32):
        # The paper's setting: 32 keyframes, then one level of short interpolations.
        assert len(keys) == 32 and len(levels) == 1


def test_expansion_plan_adds_exactly_and_respects_the_window():
    plan = g.expansion_plan(given=3, add=9, window=6)
    assert sum(new for _, new in plan) == 9
    assert all(context >= 1 and context + new <= 6 for context, new in plan)
    assert g.expansion_plan(3, 2, window=None) == [(3, 2)]


def test_library_calls_keep_references_exactly(checkpoint):
    model, meta = load_model(checkpoint)
    assert meta["kind"] == "joint" and not model.training
    image = torch.rand(3, SIZE, SIZE) * 2 - 1
    opts = g.SampleOptions(steps=1)
    calls = []
    video = g.long_video(model, image, 4, 9, opts, progress=lambda d, t: calls.append((d, t)))
    assert video.shape == (9, 3, SIZE, SIZE) and torch.equal(video[0], image)
    assert calls[-1][0] == calls[-1][1]  # progress reaches its total
    with pytest.raises(ValueError, match="at least 3 frames"):
        g.interpolate(model, image, image, 2, opts)


def test_generation_defaults_to_the_sampler_the_model_was_gated_with():
    """An export records its curriculum's sampler; generation and serving use it unless told
    otherwise, and exports written before it was recorded get the defaults."""
    meta = {"kind": "dm", "sample": {"steps": 2, "solver": "heun", "cfg_scale": 1.5}}
    opts = g.options_for(meta)
    assert (opts.steps, opts.solver, opts.cfg_scale, opts.kind) == (2, "heun", 1.5, "dm")
    given = g.options_for(meta, steps=7, cfg_scale=0.0, seed=3)
    assert (given.steps, given.solver, given.cfg_scale, given.seed) == (7, "heun", 0.0, 3)
    old = g.options_for({"kind": "joint"})
    assert (old.steps, old.solver, old.cfg_scale) == (25, "euler", 1.0)


def test_mar_checkpoint_refuses_to_generate(tmp_path):
    model = build_model("debug")
    meta = {"stage": "mar", "kind": "mar", "model": model.cfg.model_dump(mode="json")}
    url = export_final(model.state_dict(), meta, str(tmp_path / "mar"))
    _, loaded = load_model(url)
    with pytest.raises(ValueError, match="generate from a dm or joint stage"):
        g.sample_kind(loaded)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_model(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_registry_alias_loads_and_pyfunc_predicts(checkpoint, images, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from mardini.mlflow_model import log_model, register_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = "mardini-gen-test"
    model_uri = log_model(checkpoint, registered_model_name=name)
    assert model_uri == f"models:/{name}/1"
    version = register_model(checkpoint, name, aliases=("joint-interpolation", "champion"))
    assert version == "2"
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"

    # The generation loader resolves the alias to the same weights.
    model, meta = load_model(f"models:/{name}@champion", tracking_uri=uri)
    original, _ = load_model(checkpoint)
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert meta["stage"] == "joint-interpolation"

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    path, pixels = images["first"]
    (clip,) = pyfunc.predict([{"task": "i2v", "image": path, "frames": 4, "steps": 1}])
    assert clip.dtype == np.uint8 and clip.shape == (4, SIZE, SIZE, 3)
    assert np.array_equal(clip[0], pixels)

    # A DataFrame of requests (base64 inputs) as `mlflow models serve` receives it; mp4 out.
    import pandas as pd

    b64 = {k: base64.b64encode(v[0].read_bytes()).decode() for k, v in images.items()}
    requests = pd.DataFrame(
        [
            {"task": "interpolate", "first": b64["first"], "last": b64["last"], "frames": 5},
            {"task": "i2v", "image": b64["first"], "frames": 3},
        ]
    ).assign(steps=1, format="mp4")
    out = pyfunc.predict(requests)
    assert len(out) == 2
    video = tmp_path / "served.mp4"
    video.write_bytes(base64.b64decode(out[0]))
    assert read_video(video).shape == (5, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="needs field 'frames'"):
        pyfunc.predict([{"task": "i2v", "image": path}])
    with pytest.raises(ValueError, match="never read as paths"):  # served clients send strings
        pyfunc.predict([{"task": "i2v", "image": str(path), "frames": 3}])

    # The CLI loads the alias through the same path.
    _cli(
        "generate", "i2v", "--image", str(path), "--frames", "3",
        *_common(f"models:/{name}@champion", tmp_path / "alias.mp4"),
    )  # fmt: skip
    assert _decoded(tmp_path / "alias.mp4").shape == (3, SIZE, SIZE, 3)
