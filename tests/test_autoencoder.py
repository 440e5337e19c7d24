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
