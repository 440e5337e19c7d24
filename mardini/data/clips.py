"""Turning one raw shard sample into a training clip ``T 3 H W`` in [-1, 1].

In two steps, so that DataLoader workers hand over a quarter of the bytes: ``decode_frames``
(in a worker) gives the clip's frames as stored, uint8; ``frames_to_video`` (in the process
that trains) makes them floats in [-1, 1] at the stage resolution.

A stage asks for ``frames`` frames at ``fps`` and ``resolution`` px; a shard clip holds
``json.frames`` frames at ``json.fps``. The stage fps must divide the clip fps (frames are
taken every ``stride`` frames, never interpolated), and the window must fit in the clip.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch

from mardini.video import resize_center_crop

RawSample = dict[str, Any]


@dataclass(frozen=True)
class ClipSpec:
    """What a stage wants from every clip: ``frames`` frames at ``fps``, ``resolution`` px."""

    frames: int
    resolution: int
    fps: float

    def __post_init__(self) -> None:
        if self.frames < 1 or self.resolution < 1 or self.fps <= 0:
            raise ValueError(f"frames, resolution and fps must be positive, got {self}")


@dataclass(frozen=True)
class ClipInfo:
    """What a sample's ``json`` says about its clip, plus where the sample came from."""

    key: str
    url: str
    fps: float
    frames: int

    @property
    def where(self) -> str:
        """``url#key``, for error messages."""
        return f"{self.url}#{self.key}"


def clip_info(sample: RawSample) -> ClipInfo:
    """Parse a raw sample's ``json``; raises naming the shard and key if fields are missing."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    if ("mp4" not in sample and "hi.npy" not in sample) or "json" not in sample:
        raise ValueError(
            f"{url}#{key}: sample needs 'json' and 'mp4' (or cached 'hi.npy'), has "
            f"{sorted(sample)}; re-run prep"
        )
    meta = json.loads(sample["json"])
    try:
        return ClipInfo(key=key, url=url, fps=float(meta["fps"]), frames=int(meta["frames"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{url}#{key}: json lacks a valid 'fps'/'frames' ({err}); re-run prep"
        ) from err


def frame_stride(info: ClipInfo, spec: ClipSpec) -> int:
    """How many clip frames one stage frame spans; raises unless clip fps / stage fps is an int."""
    ratio = info.fps / spec.fps
    stride = round(ratio)
    if stride < 1 or abs(ratio - stride) > 1e-6:
        raise ValueError(
            f"{info.where}: clip fps {info.fps:g} is not an integer multiple of the stage fps "
            f"{spec.fps:g}; pick a stage fps that divides {info.fps:g} or re-shard at a multiple"
        )
    return stride


def window_starts(info: ClipInfo, spec: ClipSpec) -> int:
    """How many start frames a window of ``spec`` can take in this clip (at least 1)."""
    span = (spec.frames - 1) * frame_stride(info, spec) + 1
    if span > info.frames:
        raise ValueError(
            f"{info.where}: {spec.frames} frames at {spec.fps:g} fps span {span} clip frames at "
            f"{info.fps:g} fps, the clip has {info.frames}; shorten the stage or re-shard longer"
        )
    return info.frames - span + 1


def decode_frames(sample: RawSample, spec: ClipSpec, start: int = 0) -> torch.Tensor:
    """Decode ``spec.frames`` frames from clip frame ``start`` every ``stride`` frames, as
    stored: ``T 3 h w`` uint8 at the clip's own size (``frames_to_video`` makes them a clip)."""
    info = clip_info(sample)
    stride = frame_stride(info, spec)
    if not 0 <= start < window_starts(info, spec):
        raise ValueError(f"{info.where}: window start {start} does not fit {spec}")
    wanted = range(start, start + (spec.frames - 1) * stride + 1, stride)
    images: list[np.ndarray] = []
    with av.open(io.BytesIO(sample["mp4"])) as container:
        # Shard clips are constant-rate (prep writes them), so frame index = time * fps.
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                images.append(frame.to_ndarray(format="rgb24"))
            if index >= wanted[-1]:
                break
    if len(images) < spec.frames:
        raise ValueError(
            f"{info.where}: needed clip frames {wanted.start}..{wanted[-1]} step {stride}, "
            f"decoded {len(images)} of them (json says {info.frames} frames); re-run prep"
        )
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def frames_to_video(frames: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 frames ``... 3 h w`` -> floats ``... 3 R R`` in [-1, 1], resized to ``resolution``
    when their size differs; runs wherever ``frames`` is (a DataLoader's main process, a GPU)."""
    *lead, c, h, w = frames.shape
    # Same arithmetic as mardini.video.read_video, so both give bit-identical tensors.
    video = frames.reshape(-1, c, h, w).float() / 127.5 - 1.0
    if (h, w) != (resolution, resolution):
        video = resize_center_crop(video, resolution)
    return video.reshape(*lead, c, resolution, resolution)


def decode_clip(sample: RawSample, spec: ClipSpec, start: int = 0) -> torch.Tensor:
    """Decode ``spec.frames`` frames from clip frame ``start`` every ``stride`` frames;
    ``T 3 H W`` in [-1, 1] at ``spec.resolution``."""
    return frames_to_video(decode_frames(sample, spec, start), spec.resolution)
