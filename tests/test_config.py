"""Config loading: the shipped curricula validate; bad files fail naming file and key."""

from __future__ import annotations

import pytest
import yaml

from mardini.config import ConfigError, CurriculumConfig, load_config
from tests.conftest import CONFIGS


@pytest.mark.parametrize("name", ["tiny.yaml", "small.yaml", "paper.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, CurriculumConfig)
    assert cfg.stages and len({s.name for s in cfg.stages}) == len(cfg.stages)
    assert cfg.source.endswith(name)


def test_tiny_has_the_curriculum_shape():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert [s.name for s in cfg.stages] == ["mar", "dm", "joint-interpolation", "joint-i2v"]
    assert [s.kind for s in cfg.stages] == ["mar", "dm", "joint", "joint"]
    assert cfg.model.planner.width == 192  # filled in from the tiny preset


def test_paper_mirrors_the_published_recipe():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert (
        cfg.model.planner.depth == 16
        and cfg.model.planner.width == 4096
        and cfg.model.planner.mlp == 8192
    )
    assert cfg.model.generator.depth == 8 and cfg.model.generator.width == 1024
    assert cfg.model.objective == "v" and cfg.sample.steps == 25
    mar = cfg.stage("mar")
    assert (
        mar.kind == "mar"
        and mar.mask.keep == (0.65, 1.0)
        and mar.frames == 4
        and mar.resolution == 256
    )
    last = cfg.stages[-1]
    assert last.kind == "joint" and last.frames == 17 and last.mask.keep == (0.06, 0.30)
    assert cfg.stage("joint-512-temporal").generator_attention == "temporal"
    assert all(s.optimizer.lr == pytest.approx(1.4e-4) for s in cfg.stages[1:])
    # It trains its own autoencoder first (KL, 16 channels, 8x), and every stage reaches it.
    assert cfg.stages[0].kind == "autoencoder" and cfg.model.autoencoder.kind == "kl"
    assert cfg.model.autoencoder.latent_channels == 16 and cfg.model.autoencoder.path is None
    assert len(cfg.model.autoencoder.block_out_channels) == 4  # 8x
    assert cfg.stage("mar").init_from == cfg.stage("dm-4f").init_from == ["autoencoder"]


def test_overrides_by_index_and_stage_name():
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["stages.mar.steps=7", "stages.1.optimizer.lr=0.5", "model.planner.depth=3", "seed=11"],
    )
    assert cfg.stage("mar").steps == 7
    assert cfg.stages[1].optimizer.lr == 0.5
    assert cfg.model.planner.depth == 3 and cfg.model.planner.width == 192
    assert cfg.seed == 11


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _tiny_raw():
    return yaml.safe_load((CONFIGS / "tiny.yaml").read_text())


def test_unknown_key_names_file_and_key(tmp_path):
    raw = _tiny_raw()
    raw["stages"][0]["optimizer"]["lrr"] = 1e-3
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert path in str(err.value)
    assert "stages.mar.optimizer.lrr" in str(err.value)


def test_wrong_type_names_file_and_key(tmp_path):
    raw = _tiny_raw()
    raw["model"]["planner"] = {"depth": "deep"}
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert path in str(err.value) and "model.planner.depth" in str(err.value)


def test_bad_override_names_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", ["stages.nope.steps=3"])
    assert "stages.nope" in str(err.value) and "tiny.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="stages.mar.kind"):
        load_config(CONFIGS / "tiny.yaml", ["stages.mar.kind=planner"])


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_unknown_preset_and_stage(tmp_path):
    raw = _tiny_raw()
    raw["model"]["preset"] = "huge"
    with pytest.raises(ConfigError, match="model"):
        load_config(_write(tmp_path, raw))
    cfg = load_config(CONFIGS / "tiny.yaml")
    with pytest.raises(ConfigError, match="joint-interpolation"):
        cfg.stage("nope")


def test_gate_needs_a_rule(tmp_path):
    raw = _tiny_raw()
    raw["stages"][0]["gates"] = [{"metric": "loss"}]
    with pytest.raises(ConfigError, match="stages.mar.gates.0"):
        load_config(_write(tmp_path, raw))


def test_a_mistyped_gate_metric_is_refused_at_load_not_after_training():
    with pytest.raises(ConfigError, match=r"tiny.yaml.*\n.*stages\.dm\.gates: unknown metric "
                       r"'interp_psnrr' in a gate; known metrics: .*interp_psnr"):  # fmt: skip
        load_config(CONFIGS / "tiny.yaml", ["stages.dm.gates.0.metric=interp_psnrr"])
    with pytest.raises(ConfigError, match="joint-i2v.gates: gate on 'i2v_psnr' beats 'nearst'"):
        load_config(CONFIGS / "tiny.yaml", ["stages.joint-i2v.gates.1.beats=nearst"])


def test_init_from_must_name_an_earlier_stage(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.stage("joint-interpolation").init_from == ["mar", "dm"]
    assert cfg.stage("joint-i2v").init_from == ["joint-interpolation"]
    raw = _tiny_raw()
    raw["stages"][0]["init_from"] = "dm"  # dm comes after mar
    with pytest.raises(ConfigError, match="init_from 'dm'"):
        load_config(_write(tmp_path, raw))
    raw["stages"][0]["init_from"] = "models:/tiny@dm"
    assert load_config(_write(tmp_path, raw)).stages[0].init_from == ["models:/tiny@dm"]


def test_a_stage_on_a_random_kl_autoencoder_is_refused_unless_said(tmp_path):
    raw = _tiny_raw()
    raw["model"]["autoencoder"] = {"kind": "kl", "latent_channels": 4, "block_out_channels": [8]}
    with pytest.raises(
        ConfigError, match="stage 'mar' would learn in the latent space of a random"
    ):
        load_config(_write(tmp_path, raw))
    # Said explicitly, or a trained one given by path: accepted.
    for key, value in (("untrained", True), ("path", "s3://bucket/vae")):
        raw["model"]["autoencoder"][key] = value
        load_config(_write(tmp_path, raw))
        del raw["model"]["autoencoder"][key]
    # An autoencoder stage first, reached by every later stage through init_from (here dm only
    # directly; the joint stages through mar and dm once mar also starts from it).
    raw["stages"].insert(0, {"name": "vae", "kind": "autoencoder"})
    raw["stages"][2]["init_from"] = "vae"  # dm
    with pytest.raises(ConfigError, match="stage 'mar' would learn"):
        load_config(_write(tmp_path, raw))
    raw["stages"][1]["init_from"] = "vae"  # mar
    cfg = load_config(_write(tmp_path, raw))
    assert [s.name for s in cfg.stages][:3] == ["vae", "mar", "dm"]
