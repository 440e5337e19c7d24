"""Autoencoders: pixel space is the identity; the KL autoencoder builds from config, offline."""

from __future__ import annotations

import pytest
import torch

from mardini.autoencoder import KLAutoencoder, PixelAutoencoder, build_autoencoder
from mardini.config import AutoencoderConfig, ModelConfig
from mardini.models import build_model


def test_pixel_is_identity():
    ae = build_autoencoder(AutoencoderConfig(kind="pixel"))
    assert isinstance(ae, PixelAutoencoder) and ae.downsample == 1 and ae.channels == 3
    x = torch.rand(2, 3, 3, 8, 8)
    assert torch.equal(ae.decode(ae.encode(x)), x)


def test_paper_autoencoder_shape_on_meta():
    with torch.device("meta"):
        ae = build_autoencoder(AutoencoderConfig(kind="kl", latent_channels=16))
    assert ae.channels == 16 and ae.downsample == 8


@pytest.fixture(scope="module")
def small_kl_cfg():
    return AutoencoderConfig(
        kind="kl", latent_channels=4, block_out_channels=[8, 16], layers_per_block=1
    )


def test_kl_autoencoder_per_frame_shapes_and_determinism(small_kl_cfg):
    torch.manual_seed(0)
    ae = build_autoencoder(small_kl_cfg).eval()
    assert isinstance(ae, KLAutoencoder) and ae.downsample == 2
    x = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 3, 4, 8, 8)
        assert torch.equal(z, ae.encode(x))  # posterior mean, not a sample
        # Per frame: a frame's latents do not depend on the other frames.
        y = x.clone()
        y[:, 1] = 0
        assert torch.equal(ae.encode(y)[:, 0], z[:, 0])
        assert ae.decode(z).shape == x.shape


def test_kl_autoencoder_loads_from_local_directory(small_kl_cfg, tmp_path):
    torch.manual_seed(0)
    ae = build_autoencoder(small_kl_cfg)
    ae.vae.save_pretrained(tmp_path / "vae")
    loaded = build_autoencoder(small_kl_cfg.model_copy(update={"path": str(tmp_path / "vae")}))
    x = torch.rand(1, 2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), ae.encode(x))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_autoencoder(small_kl_cfg.model_copy(update={"path": str(tmp_path / "missing")}))


def test_kl_autoencoder_loads_from_the_object_store(small_kl_cfg, s3_bucket, tmp_path):
    """``autoencoder.path`` may be an ``s3://`` directory (here on moto): a PyTorchJob mounts
    no local one."""
    from mardini.storage import filesystem

    torch.manual_seed(0)
    ae = build_autoencoder(small_kl_cfg)
    ae.vae.save_pretrained(tmp_path / "vae")
    url = f"{s3_bucket}/autoencoders/small"
    fs, path = filesystem(url)
    for file in (tmp_path / "vae").iterdir():
        fs.put_file(str(file), f"{path}/{file.name}")
    loaded = build_autoencoder(small_kl_cfg.model_copy(update={"path": url}))
    for key, value in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/autoencoders/none.*no config.json"):
        build_autoencoder(
            small_kl_cfg.model_copy(update={"path": f"{s3_bucket}/autoencoders/none"})
        )


def test_mardini_trains_in_kl_latent_space(small_kl_cfg):
    """The whole model works over KL latents: latents shrink, the loss is finite and the
    sample still returns the reference frames exactly (in pixels)."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", autoencoder=small_kl_cfg)
    model = build_model(cfg)
    assert model.autoencoder.channels == 4
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    video = torch.rand(1, 3, 3, 32, 32) * 2 - 1
    mask = torch.tensor([[True, False, True]])
    loss = model(video, mask, kind="joint")["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    out = model.eval().sample(video, mask, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[mask], video[mask])


def test_later_stages_load_the_autoencoder_stage_export_from_the_store(small_kl_cfg, s3_bucket):
    """An ``autoencoder`` stage's export on S3 is what a later stage encodes with (through
    ``init_from``), not the random weights its model starts from."""
    from mardini.config import CurriculumConfig
    from mardini.export import export_final, stage_autoencoder
    from mardini.layout import stage_dir

    cfg = CurriculumConfig.model_validate(
        {
            "name": "ae-chain",
            "model": {"preset": "debug", "autoencoder": small_kl_cfg.model_dump()},
            "stages": [
                {"name": "vae", "kind": "autoencoder"},
                {"name": "dm", "kind": "dm", "init_from": "vae"},
            ],
        }
    )
    torch.manual_seed(123)  # "trained": other weights than the seeded start
    trained = build_model(cfg.model)
    meta = {"stage": "vae", "kind": "autoencoder", "trained_parts": ["autoencoder"]}
    export_final(trained.state_dict(), meta, stage_dir(s3_bucket, "ae-chain", "vae"))
    loaded = stage_autoencoder(cfg, cfg.stage("dm"), s3_bucket)
    for key, value in trained.autoencoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
