"""Per-frame autoencoders: pixel space (identity) and a KL autoencoder on diffusers.

Both take frames in [-1, 1] as ``B T 3 H W`` and return latents ``B T C H/f W/f`` (f the
spatial downsampling factor); there is no temporal compression, as in the paper. Nothing is
downloaded from a hub: the KL autoencoder is built from config, or loaded from a
``save_pretrained`` directory in the store (local or any fsspec URL).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mardini.config import AutoencoderConfig
from mardini.storage import filesystem, is_local_url, retry


class Autoencoder(nn.Module):
    """Interface: ``encode``/``decode`` per frame, with ``channels`` and ``downsample``."""

    channels: int
    downsample: int

    def encode(self, video_BTCHW: torch.Tensor) -> torch.Tensor:
        """Frames in [-1, 1] -> normalised latents."""
        raise NotImplementedError

    def decode(self, latents_BTChw: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> frames (roughly in [-1, 1])."""
        raise NotImplementedError


class PixelAutoencoder(Autoencoder):
    """Identity: the diffusion models work on pixels (tests, the tiny CPU demo)."""

    channels = 3
    downsample = 1

    def encode(self, video_BTCHW):
        return video_BTCHW

    def decode(self, latents_BTChw):
        return latents_BTChw


class KLAutoencoder(Autoencoder):
    """``diffusers.AutoencoderKL`` applied frame by frame; 16 channels and 8x by default."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        from diffusers import AutoencoderKL  # heavy import, only when this autoencoder is used

        if cfg.path is not None:
            self.vae = _load_pretrained(AutoencoderKL, cfg.path)
        else:
            blocks = len(cfg.block_out_channels)
            self.vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=cfg.latent_channels,
                block_out_channels=tuple(cfg.block_out_channels),
                down_block_types=("DownEncoderBlock2D",) * blocks,
                up_block_types=("UpDecoderBlock2D",) * blocks,
                layers_per_block=cfg.layers_per_block,
                norm_num_groups=min(32, min(cfg.block_out_channels)),
            )
        self.channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scale, self.shift = cfg.scaling_factor, cfg.shift_factor

    def encode(self, video_BTCHW):
        b = video_BTCHW.shape[0]
        frames = rearrange(video_BTCHW, "b t c h w -> (b t) c h w")
        # The posterior mean, not a sample: latents of a clip are deterministic.
        z = self.vae.encode(frames).latent_dist.mode()
        return rearrange((z - self.shift) * self.scale, "(b t) c h w -> b t c h w", b=b)

    def loss(self, video_BTCHW: torch.Tensor, kl_weight: float = 1e-6) -> dict[str, torch.Tensor]:
        """Training loss of the ``autoencoder`` stage: pixel MSE of a posterior sample + KL."""
        frames = rearrange(video_BTCHW, "b t c h w -> (b t) c h w")
        posterior = self.vae.encode(frames).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, frames)
        kl = posterior.kl().mean() / frames[0].numel()
        return {"loss": mse + kl_weight * kl, "mse": mse.detach(), "kl": kl.detach()}

    def decode(self, latents_BTChw):
        b = latents_BTChw.shape[0]
        z = rearrange(latents_BTChw, "b t c h w -> (b t) c h w") / self.scale + self.shift
        return rearrange(self.vae.decode(z).sample, "(b t) c h w -> b t c h w", b=b)


def _load_pretrained(cls: type, url: str) -> nn.Module:
    """``cls.from_pretrained`` of a save_pretrained directory at a local path or any fsspec URL
    (copied to a temporary directory first; nothing is fetched from a hub)."""
    fs, path = filesystem(url)
    if not fs.exists(f"{path.rstrip('/')}/config.json"):
        raise FileNotFoundError(
            f"autoencoder.path {url!r} has no config.json; give a directory written by "
            "AutoencoderKL.save_pretrained, local or s3:// (hub ids are not fetched: no "
            "downloads at run time)"
        )
    if is_local_url(url):
        return cls.from_pretrained(path, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        for remote in fs.find(path):
            local = Path(tmp, remote[len(path.rstrip("/")) + 1 :])
            local.parent.mkdir(parents=True, exist_ok=True)
            retry(lambda r=remote, f=local: fs.get_file(r, str(f)), f"reading {url}")
        return cls.from_pretrained(tmp, local_files_only=True)


@torch.no_grad()
def encode_pair(
    autoencoder: Autoencoder, video_BT3HW: torch.Tensor, planner_downscale: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of a clip at both resolutions: ``(hi, lo)`` for the generator and the planner.

    ``lo`` encodes the frames area-downscaled by ``planner_downscale``. The one definition the
    model, the latent cache (``mardini prep latents``) and the benchmarks share.
    """
    hi = autoencoder.encode(video_BT3HW)
    if planner_downscale == 1:
        return hi, hi
    small = F.interpolate(
        rearrange(video_BT3HW, "b t c h w -> (b t) c h w"),
        scale_factor=1 / planner_downscale,
        mode="area",
    )
    lo = autoencoder.encode(rearrange(small, "(b t) c h w -> b t c h w", b=video_BT3HW.shape[0]))
    return hi, lo


def fingerprint(autoencoder: Autoencoder, planner_downscale: int) -> str:
    """SHA-256 of what latents depend on: the autoencoder's class, weights and normalisation,
    and the planner's downscale. Equal fingerprints give equal latents for equal frames."""
    digest = hashlib.sha256()
    scale = (getattr(autoencoder, "scale", 1.0), getattr(autoencoder, "shift", 0.0))
    digest.update(f"{type(autoencoder).__name__}/{scale}/{planner_downscale}".encode())
    for name, tensor in sorted(autoencoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """The autoencoder named by ``cfg.kind``."""
    if cfg.kind == "pixel":
        return PixelAutoencoder()
    return KLAutoencoder(cfg)
