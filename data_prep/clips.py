"""One source video in, fixed-length clips out: probe, decode, scene-split, resample, crop,
filter, encode. Every way a file can fail becomes a ``Rejected(reason, detail)``, never a crash.

Streaming: frames are decoded, fed to the cut detector and cut into clips on the fly, and each
clip is encoded and spooled to a local file as soon as it is complete, so memory holds at most
one clip of frames whatever the video's length.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from data_prep.config import PrepConfig
from data_prep.inputs import InputFile
from data_prep.scenes import SceneCuts
from mardini.storage import filesystem, is_local_url
from mardini.x264 import x264_options

log = logging.getLogger(__name__)

# Reason codes a manifest can give for a rejected input (``detail`` says the specifics).
REASONS = {
    "empty": "the file has 0 bytes",
    "unreadable": "the source could not be read from its store",
    "not_media": "not a media file FFmpeg recognizes",
    "corrupt": "a media container FFmpeg cannot open or decode (truncated or damaged)",
    "still_image": "an image, not a video",
    "no_video": "a media file without a video stream",
    "oversized": "declared (or decoded) size, duration or frame count over the prep limits",
    "too_short": "no scene is long enough for one clip",
    "static": "every clip scored below the motion threshold",
    "crashed": "the process reading it died (an FFmpeg crash, or killed for memory)",
    "error": "an unexpected error while processing (a bug: please report it)",
}

# Leading bytes of containers FFmpeg reads: a file that starts like one but does not open is
# damaged ("corrupt"); anything else is "not_media".
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "MP4/QuickTime"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"RIFF", "AVI"),
    (0, b"OggS", "Ogg"),
    (0, b"FLV", "FLV"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"),
    (0, b"\x00\x00\x01\xb3", "MPEG video"),
    (0, b"YUV4MPEG2", "Y4M"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF/WMV"),
)
# Width of the frames the cut detector and the motion score look at.
_SMALL_WIDTH = 64
# A timestamp jump longer than this is treated as a cut (and never bridged by duplicates).
_MAX_GAP_S = 2.0


class Rejected(Exception):
    """An input that yields no clips; ``reason`` is a key of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class ClipRecord:
    """One encoded clip waiting in the local spool for the shard writer."""

    key: str
    path: str  # local spool file holding the mp4 bytes
    meta: dict[str, Any]


@dataclass
class VideoResult:
    """What processing one input produced: its manifest entry and its clips (maybe none)."""

    entry: dict[str, Any]
    clips: list[ClipRecord] = field(default_factory=list)


def split_score(name: str) -> float:
    """A stable number in [0, 1) per source name; below ``val_fraction`` means validation."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64


def is_synthetic(name: str, cfg: PrepConfig) -> bool:
    """Whether an input name matches one of ``cfg.synthetic``'s patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.synthetic)


def split_of(name: str, val_fraction: float, synthetic: bool = False) -> str:
    """``"val"`` or ``"train"`` for a source, from its name alone (all its clips go together);
    synthetic sources always train."""
    if synthetic:
        return "train"
    return "val" if split_score(name) < val_fraction else "train"


def sample_key(inp: InputFile, index: int) -> str:
    """WebDataset key for clip ``index`` of ``inp``: readable stem + name hash, no dots.

    The hash is of the input's name (unique within a run, see ``list_inputs``), not its absolute
    URL, so keys do not depend on where the videos lie."""
    stem = os.path.splitext(os.path.basename(inp.name))[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:40] or "video"
    return f"{stem}-{hashlib.sha1(inp.name.encode()).hexdigest()[:10]}-{index:04d}"


def encode_clip(
    frames_i420: list[np.ndarray], cfg: PrepConfig, color: dict[str, int] | None = None
) -> bytes:
    """Encode I420 frames (``size*3/2 x size`` uint8 each) as an H.264 mp4, in memory.

    ``color`` tags the stream with the source's matrix/primaries/transfer (the pixels are the
    source's own YUV values, never converted through RGB). The bytes are reproducible.
    """
    size = frames_i420[0].shape[1]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(cfg.fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"crf": str(cfg.crf), "preset": cfg.preset, **x264_options()}
        for name, value in (color or {}).items():
            setattr(stream.codec_context, name, value)
        # One x264 thread: the pool already fills the cores, and x264's output depends on its
        # thread count, so a fixed count keeps shard bytes identical across machines.
        stream.codec_context.thread_count = 1
        for image in frames_i420:
            frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _crop_i420(frame: av.VideoFrame, top: int, left: int, size: int) -> np.ndarray:
    """Square crop of a yuv420p frame (even ``top``/``left``) as one I420 array, copied."""
    parts = []
    for index, (y0, x0, side) in enumerate(
        ((top, left, size), (top // 2, left // 2, size // 2), (top // 2, left // 2, size // 2))
    ):
        plane = frame.planes[index]
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        parts.append(rows[y0 : y0 + side, x0 : x0 + side].ravel())
    return np.concatenate(parts).reshape(size * 3 // 2, size)


@contextlib.contextmanager
def _source(url: str) -> Iterator[str | IO[bytes]]:
    """A local path as is; a remote URL as a seekable fsspec file (read in 8 MiB blocks)."""
    if is_local_url(url):
        yield url.removeprefix("file://")
        return
    fs, path = filesystem(url)
    with fs.open(path, "rb", block_size=8 * 2**20) as handle:
        yield handle


def _head(src: str | IO[bytes], count: int = 16) -> bytes:
    """The first bytes of the source (empty if it cannot be read)."""
    try:
        if isinstance(src, str):
            with open(src, "rb") as handle:
                return handle.read(count)
        src.seek(0)
        head = src.read(count)
        src.seek(0)
        return head
    except OSError:
        return b""


def _unopenable(src: str | IO[bytes], err: Exception) -> Rejected:
    """Tell a missing file, a damaged video container and a file that is no media apart."""
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return Rejected("unreadable", f"cannot read the source: {err}")
    head = _head(src)
    for offset, magic, kind in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return Rejected(
                "corrupt",
                f"{kind} container that FFmpeg cannot open (truncated or damaged?): {err}",
            )
    return Rejected("not_media", f"FFmpeg does not recognize it (starts with {head[:12]!r}): {err}")


def _probe(container: av.container.InputContainer) -> dict[str, Any]:
    """What the container *declares* about its video stream; reading it decodes nothing."""
    fmt = container.format.name
    if fmt.startswith("image2") or fmt.endswith("_pipe"):
        raise Rejected("still_image", f"an image ({fmt} format), not a video")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise Rejected("no_video", f"no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise Rejected("corrupt", f"video stream declares no frame size ({width}x{height})")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = None
    frames = stream.frames or (round(duration * fps) if duration and fps else None)
    return {
        "format": fmt,
        "codec": stream.codec_context.name,
        "width": width,
        "height": height,
        "fps": round(fps, 4) if fps else None,
        "duration": round(duration, 4) if duration is not None else None,
        "frames": frames,
    }


def _check_limits(probe: dict[str, Any], cfg: PrepConfig) -> None:
    """Reject decompression bombs and hopeless inputs on the declared numbers alone."""
    width, height = probe["width"], probe["height"]
    duration, frames = probe["duration"], probe["frames"]
    if width > cfg.max_width or height > cfg.max_height or width * height > cfg.max_pixels:
        raise Rejected(
            "oversized",
            f"declares {width}x{height} ({width * height / 1e6:.1f} Mpx) frames; limits are "
            f"max_width={cfg.max_width}, max_height={cfg.max_height}, "
            f"max_pixels={cfg.max_pixels} ({cfg.max_pixels / 1e6:.1f} Mpx): raise them in "
            "the prep config if this file is genuine",
        )
    if duration is not None and duration > cfg.max_duration_s:
        raise Rejected(
            "oversized",
            f"declares {duration:.1f} s, over max_duration_s={cfg.max_duration_s:g}; "
            "raise it in the prep config or split the file",
        )
    if frames is not None and frames > cfg.max_frames:
        raise Rejected(
            "oversized",
            f"declares {frames} frames, over max_frames={cfg.max_frames}; "
            "raise it in the prep config or split the file",
        )
    clip_s = (cfg.frames - 1) / cfg.fps
    if duration is not None and duration < clip_s:
        raise Rejected(
            "too_short",
            f"declares {duration:.3f} s ({frames} frames), shorter than one clip "
            f"({cfg.frames} frames at {cfg.fps:g} fps = {clip_s:.2f} s)",
        )


def _clip_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int, str]:
    """Scaled width/height (short side = ``size``), crop offsets and the swscale filter.

    Everything is even so the crop falls on whole 2x2 chroma blocks of yuv420p.
    """
    scale = size / min(width, height)
    scaled_w = max(size, 2 * round(width * scale / 2))
    scaled_h = max(size, 2 * round(height * scale / 2))
    # Area averaging when shrinking (no aliasing), bilinear when enlarging, as in mardini.video.
    interpolation = "AREA" if scale < 1 else "BILINEAR"
    top, left = (scaled_h - size) // 4 * 2, (scaled_w - size) // 4 * 2
    return scaled_w, scaled_h, top, left, interpolation


def _motion(grays: list[np.ndarray]) -> float:
    """Mean absolute difference of consecutive small grayscale frames (0-255 scale)."""
    return float(np.mean([np.abs(b - a).mean() for a, b in zip(grays, grays[1:], strict=False)]))


def _cut_clips(
    container: av.container.InputContainer,
    inp: InputFile,
    cfg: PrepConfig,
    spool_dir: str,
    threads: int,
    stats: dict[str, Any],
    clips: list[ClipRecord],
) -> None:
    """Decode, cut at scenes, resample to ``cfg.fps``, crop, score, encode; append to ``clips``."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads in FFmpeg's decoder
    stream.thread_count = threads
    width, height = stream.codec_context.width, stream.codec_context.height
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    scaled_w, scaled_h, top, left, interpolation = _clip_geometry(width, height, cfg.size)
    small_w = min(_SMALL_WIDTH, width)
    small_h = max(2, round(height * small_w / width))
    # One reformatter per output size: each keeps its swscale context instead of rebuilding it
    # for every frame (which doubled the cost of decoding in measurements).
    to_small, to_clip = VideoReformatter(), VideoReformatter()
    codec = stream.codec_context
    # Tag clips with the source's colour description (2 = unspecified: leave the default).
    color = {
        name: int(getattr(codec, name))
        for name in ("colorspace", "color_primaries", "color_trc")
        if getattr(codec, name) not in (None, 2)
    }
    cuts = SceneCuts(cfg.scene_threshold, cfg.min_scene_s, rate)
    period, eps = 1.0 / cfg.fps, 1e-6

    images: list[np.ndarray] = []
    grays: list[np.ndarray] = []
    first_t = scene_start = clip_start = next_tick = t = 0.0
    for index, frame in enumerate(container.decode(stream)):
        if (
            frame.width > cfg.max_width
            or frame.height > cfg.max_height
            or frame.width * frame.height > cfg.max_pixels
        ):
            raise Rejected(
                "oversized",
                f"frame {index} decodes to {frame.width}x{frame.height}, over the limits "
                f"(the stream declared {width}x{height})",
            )
        if index >= cfg.max_frames:
            raise Rejected("oversized", f"decodes past max_frames={cfg.max_frames}")
        t = frame.time if frame.time is not None else index / rate
        if index == 0:
            first_t = scene_start = next_tick = t
        elif t - first_t > cfg.max_duration_s:
            raise Rejected("oversized", f"decodes past max_duration_s={cfg.max_duration_s:g}")
        stats["decoded_frames"] = index + 1
        small = to_small.reformat(
            frame, width=small_w, height=small_h, format="bgr24", interpolation="AREA", threads=1
        ).to_ndarray()
        cut = cuts.is_cut(index, small)
        if t - next_tick > _MAX_GAP_S:  # a timestamp jump: never bridge it with duplicates
            cut, next_tick = True, t
        if cut:
            stats["scenes"] += 1
            stats["longest_scene_s"] = max(stats["longest_scene_s"], t - scene_start)
            scene_start = t
            images, grays = [], []
        if next_tick > t + eps:
            continue  # between two ticks of the clip frame rate: only the detector needed it
        # Scale straight to yuv420p (what x264 takes): no round trip through RGB. Full-range
        # sources are brought to the limited range every player assumes for untagged video.
        scaled = to_clip.reformat(
            frame,
            width=scaled_w,
            height=scaled_h,
            format="yuv420p",
            interpolation=interpolation,
            src_color_range=int(frame.color_range) or None,
            dst_color_range=1,
            threads=1,
        )
        image = _crop_i420(scaled, top, left, cfg.size)
        gray = small.mean(axis=2, dtype=np.float32)
        # Resample by time: each tick takes the first frame at or after it (a frame repeats when
        # the source rate is below cfg.fps).
        while next_tick <= t + eps:
            if not images:
                clip_start = next_tick
            images.append(image)
            grays.append(gray)
            next_tick += period
            if len(images) == cfg.frames:
                clip = _finish_clip(
                    images, grays, clip_start, len(clips), inp, cfg, spool_dir, stats, color
                )
                if clip:
                    clips.append(clip)
                images, grays = [], []
    stats["longest_scene_s"] = round(max(stats["longest_scene_s"], t - scene_start), 4)


def _finish_clip(
    images: list[np.ndarray],
    grays: list[np.ndarray],
    start: float,
    index: int,
    inp: InputFile,
    cfg: PrepConfig,
    spool_dir: str,
    stats: dict[str, Any],
    color: dict[str, int],
) -> ClipRecord | None:
    """Score a full clip; drop it if static, else encode it and spool the mp4."""
    motion = _motion(grays)
    stats["candidates"] += 1
    stats["max_motion"] = round(max(stats["max_motion"], motion), 4)
    if motion < cfg.motion_threshold:
        stats["static"] += 1
        return None
    key = sample_key(inp, index)
    path = os.path.join(spool_dir, f"{key}.mp4")
    with open(path, "wb") as handle:
        handle.write(encode_clip(images, cfg, color))
    meta = {
        "source": inp.url,
        "name": inp.name,
        "start": round(start, 4),
        "fps": cfg.fps,
        "size": cfg.size,
        "frames": cfg.frames,
        "scene": stats["scenes"] - 1,
        "scores": {"motion": round(motion, 4)},
        "synthetic": is_synthetic(inp.name, cfg),
    }
    return ClipRecord(key=key, path=path, meta=meta)


def _new_entry(inp: InputFile, cfg: PrepConfig) -> dict[str, Any]:
    """A manifest entry for ``inp`` before any processing (accepted, no clips yet)."""
    synthetic = is_synthetic(inp.name, cfg)
    return {
        "url": inp.url,
        "name": inp.name,
        "bytes": inp.size,
        "split": split_of(inp.name, cfg.val_fraction, synthetic),
        "synthetic": synthetic,
        "status": "accepted",
        "reason": None,
        "detail": None,
        "clips": 0,
        "probe": None,
        "stats": {
            "decoded_frames": 0,
            "scenes": 1,
            "longest_scene_s": 0.0,
            "candidates": 0,
            "static": 0,
            "max_motion": 0.0,
        },
    }


def rejected_result(inp: InputFile, cfg: PrepConfig, reason: str, detail: str) -> VideoResult:
    """The result of an input rejected without processing it here (e.g. its process died)."""
    entry = _new_entry(inp, cfg)
    entry.update(status="rejected", reason=reason, detail=detail)
    return VideoResult(entry=entry)


def process_video(inp: InputFile, cfg: PrepConfig, spool_dir: str, threads: int = 1) -> VideoResult:
    """Probe, decode and clip one input; rejects carry a reason code and a detail, never raise."""
    entry = _new_entry(inp, cfg)
    stats: dict[str, Any] = entry["stats"]
    clips: list[ClipRecord] = []
    try:
        if inp.size == 0:
            raise Rejected("empty", "the file has 0 bytes")
        with contextlib.ExitStack() as stack:
            try:
                src = stack.enter_context(_source(inp.url))
            except (OSError, ValueError) as err:
                raise Rejected("unreadable", f"cannot open the source: {err}") from err
            try:
                # max_pixels also makes FFmpeg's own decoders refuse oversized frames.
                container = av.open(src, options={"max_pixels": str(cfg.max_pixels)})
            except av.FFmpegError as err:
                raise _unopenable(src, err) from err
            with container:
                entry["probe"] = _probe(container)
                _check_limits(entry["probe"], cfg)
                try:
                    _cut_clips(container, inp, cfg, spool_dir, threads, stats, clips)
                except av.FFmpegError as err:
                    raise Rejected(
                        "corrupt",
                        f"decoding failed after {stats['decoded_frames']} frames "
                        f"(truncated or damaged?): {err}",
                    ) from err
        if not clips:
            clip_s = (cfg.frames - 1) / cfg.fps
            if stats["decoded_frames"] == 0:
                raise Rejected("corrupt", "the video stream decoded to 0 frames")
            if stats["candidates"] == 0:
                raise Rejected(
                    "too_short",
                    f"no scene lasts one clip ({cfg.frames} frames at {cfg.fps:g} fps = "
                    f"{clip_s:.2f} s): {stats['decoded_frames']} frames in {stats['scenes']} "
                    f"scene(s), the longest {stats['longest_scene_s']:.2f} s",
                )
            raise Rejected(
                "static",
                f"all {stats['candidates']} clips are static: highest motion score "
                f"{stats['max_motion']:.3f} < motion_threshold {cfg.motion_threshold:g}",
            )
    except Rejected as rejected:
        entry.update(status="rejected", reason=rejected.reason, detail=rejected.detail)
    except Exception as err:  # never let one file end a run of thousands
        log.exception("%s: unexpected error while processing", inp.url)
        entry.update(status="rejected", reason="error", detail=f"{type(err).__name__}: {err}")
    if entry["status"] == "rejected":
        for clip in clips:
            with contextlib.suppress(OSError):
                os.remove(clip.path)
        clips = []
        log.info("%s: rejected (%s) %s", inp.url, entry["reason"], entry["detail"])
    entry["clips"] = len(clips)
    return VideoResult(entry=entry, clips=clips)
