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


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file (or a video's first frame) as ``3 size size`` in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} not found")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        frame = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None] / 127.5 - 1.0
        return resize_center_crop(frame, size)[0]
    except UnidentifiedImageError:
        return read_video(path, frames=1, size=size)[0]


def read_clip(path: str | Path, size: int, fps: float | None = None) -> torch.Tensor:
    """Every frame of a video file (resampled to ``fps`` if given) as ``T 3 size size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input video {path} not found")
    return read_video(path, size=size, fps=fps)


def write_gif(path: str | Path, video_T3HW: torch.Tensor, fps: float = 8.0) -> Path:
    """Write an animated GIF that loops forever."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(frame) for frame in to_uint8(video_T3HW)]
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=max(20, round(1000 / fps)),
        loop=0,
        disposal=1,
    )
    return path


def write_lossless_mp4(path: str | Path, video_T3HW: torch.Tensor, fps: float = 8.0) -> Path:
    """Lossless RGB H.264 (``libx264rgb``, qp 0): decodes to exactly the uint8 frames."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video_T3HW)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        stream.options = {"qp": "0", "preset": "veryfast"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def save_video(
    video_T3HW: torch.Tensor,
    out: str | Path,
    fps: float = 8.0,
    gif: bool = False,
    lossless: bool = False,
) -> list[Path]:
    """Write ``out`` (mp4: H.264 yuv420p, or lossless RGB) and, with ``gif``, ``out.gif``."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        out = out.with_suffix(".mp4")
    paths = [
        write_lossless_mp4(out, video_T3HW, fps) if lossless else write_video(out, video_T3HW, fps)
    ]
    if gif:
        paths.append(write_gif(out.with_suffix(".gif"), video_T3HW, fps))
    return paths
