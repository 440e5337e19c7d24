"""Reading and writing short clips with PyAV, as float tensors ``T C H W`` in [-1, 1]."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from mardini.x264 import x264_options


def read_video(
    path: str | Path,
    frames: int | None = None,
    size: int | None = None,
    fps: float | None = None,
    start: float = 0.0,
) -> torch.Tensor:
    """Decode ``frames`` frames from ``start`` seconds, optionally resampled to ``fps`` and
    resized/center-cropped to ``size`` x ``size``; returns ``T 3 H W`` in [-1, 1]."""
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        period = 1.0 / fps if fps else 0.0
        next_time = start
        for frame in container.decode(stream):
            # Keep the first frame at or after each tick of the target frame rate.
            if frame.time is None or frame.time + 1e-6 < next_time:
                continue
            out.append(frame.to_ndarray(format="rgb24"))
            next_time = next_time + period if fps else frame.time
            if frames is not None and len(out) == frames:
                break
    if not out or (frames is not None and len(out) < frames):
        raise ValueError(
            f"{path}: needed {frames} frames from {start}s at fps={fps}, decoded {len(out)}"
        )
    video = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return resize_center_crop(video, size) if size else video


def resize_center_crop(video_TCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (area filter when shrinking), then center-crop square."""
    _, _, h, w = video_TCHW.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    mode = "area" if scale < 1 else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    video = F.interpolate(video_TCHW, size=(nh, nw), mode=mode, **kwargs)
    top, left = (nh - size) // 2, (nw - size) // 2
    return video[:, :, top : top + size, left : left + size].clamp(-1, 1)


def to_uint8(video_TCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats -> ``T H W 3`` uint8."""
    return (
        ((video_TCHW.detach().float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .byte()
        .permute(0, 2, 3, 1)
        .numpy()
    )


def write_video(
    path: str | Path, video_TCHW: torch.Tensor, fps: float = 8.0, crf: int = 18
) -> Path:
    """Encode a clip as H.264 mp4 (yuv420p, playable everywhere); sides are padded to even."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video_TCHW)
    h, w = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), **x264_options()}
        for image in frames:
            image = np.pad(
                image, ((0, h - image.shape[0]), (0, w - image.shape[1]), (0, 0)), mode="edge"
            )
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path
