"""Labelled picture grids: the evaluation's sample GIFs (MLflow) and the demo's summary.

One drawing for both: cells ``R C T 3 H W`` (rows, columns, frames) become frames ``T 3 H' W'``
with the row labels at the left, the column titles on top and an optional title per frame,
each cell upscaled by an integer factor with nearest-neighbour so 32-px frames stay visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mardini.video import to_uint8

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PAD = 4  # pixels around labels and between cells
FONT_SIZE = 14


@cache
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``FONT_SIZE`` (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError):
        return ImageFont.load_default()


def text_size(text: str) -> tuple[int, int]:
    """Width and height in pixels of ``text`` in ``font()``."""
    left, top, right, bottom = font().getbbox(text or " ")
    return int(right - left), int(bottom - top)


@dataclass(frozen=True)
class Layout:
    """Where things go in a labelled grid (pixels)."""

    rows: int
    columns: int
    cell_h: int
    cell_w: int
    label_w: int  # left margin for row labels
    header_h: int  # top margin for the title and the column titles

    @property
    def width(self) -> int:
        """Picture width."""
        return self.label_w + self.columns * (self.cell_w + PAD) + PAD

    @property
    def height(self) -> int:
        """Picture height."""
        return self.header_h + self.rows * (self.cell_h + PAD) + PAD

    def cell(self, row: int, column: int) -> tuple[int, int]:
        """Top-left corner of a cell."""
        return (
            self.label_w + PAD + column * (self.cell_w + PAD),
            self.header_h + PAD + row * (self.cell_h + PAD),
        )


def layout(
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell_hw: tuple[int, int],
    scale: int,
    titled: bool = False,
) -> Layout:
    """The layout of a grid of ``len(row_labels) x len(column_labels)`` cells of ``cell_hw``."""
    line = text_size("Ag")[1] + 2 * PAD
    label_w = max((text_size(t)[0] for t in row_labels), default=0) + 2 * PAD
    lines = int(titled) + int(any(column_labels))
    return Layout(
        rows=len(row_labels),
        columns=len(column_labels),
        cell_h=cell_hw[0] * scale,
        cell_w=cell_hw[1] * scale,
        label_w=label_w,
        header_h=line * lines,
    )


def draw_grid(
    cells_RCT3HW: torch.Tensor,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    scale: int = 4,
    titles: Sequence[str] | None = None,
) -> list[Image.Image]:
    """Cells in [-1, 1] as one labelled RGB picture per frame (``titles``: one per frame)."""
    r, c, t = cells_RCT3HW.shape[:3]
    if (r, c) != (len(row_labels), len(column_labels)):
        raise ValueError(
            f"{r}x{c} cells need {r} row labels and {c} column labels, got "
            f"{len(row_labels)} and {len(column_labels)}"
        )
    if titles is not None and len(titles) != t:
        raise ValueError(f"{t} frames need {t} titles, got {len(titles)}")
    geo = layout(row_labels, column_labels, cells_RCT3HW.shape[-2:], scale, titles is not None)
    # uint8 cells R C T H W 3, upscaled with nearest-neighbour.
    pixels = to_uint8(cells_RCT3HW.reshape(-1, *cells_RCT3HW.shape[-3:]))
    pixels = pixels.reshape(r, c, t, *pixels.shape[1:])
    pixels = pixels.repeat(scale, axis=3).repeat(scale, axis=4)
    line = text_size("Ag")[1] + 2 * PAD
    base = Image.new("RGB", (geo.width, geo.height), BACKGROUND)
    pen = ImageDraw.Draw(base)
    for j, label in enumerate(column_labels):
        x, _ = geo.cell(0, j)
        w = text_size(label)[0]
        pen.text((x + max(0, (geo.cell_w - w) // 2), geo.header_h - line + PAD), label, INK, font())
    for i, label in enumerate(row_labels):
        _, y = geo.cell(i, 0)
        h = text_size(label)[1]
        pen.text((PAD, y + max(0, (geo.cell_h - h) // 2)), label, INK, font())
    frames = []
    for k in range(t):
        image = base.copy()
        for i in range(r):
            for j in range(c):
                image.paste(Image.fromarray(np.ascontiguousarray(pixels[i, j, k])), geo.cell(i, j))
        if titles is not None:
            ImageDraw.Draw(image).text((PAD, PAD), titles[k], INK, font())
        frames.append(image)
    return frames


def to_video(frames: Sequence[Image.Image]) -> torch.Tensor:
    """Pictures as a clip ``T 3 H W`` in [-1, 1] (for the mp4 and GIF writers)."""
    array = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_gif(path: str | Path, frames: Sequence[Image.Image], fps: float) -> Path:
    """An animated GIF of ``frames`` that loops forever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        path,
        save_all=True,
        append_images=list(frames[1:]),
        duration=max(20, round(1000 / fps)),
        loop=0,
        disposal=1,
    )
    return path


def frame_labels(given_T: torch.Tensor) -> list[str]:
    """Column titles of a clip's frames: the number, and "given" for a reference frame."""
    return [f"{t + 1} given" if bool(g) else f"{t + 1}" for t, g in enumerate(given_T)]


def comparison(
    rows: dict[str, torch.Tensor], given_T: torch.Tensor, scale: int = 4
) -> tuple[Image.Image, list[Image.Image]]:
    """One clip's ``T 3 H W`` versions (ground truth, baselines, model): a still with frames in
    columns and one row per version, and the GIF's frames (the versions stacked, animated)."""
    names = list(rows)
    clips = torch.stack([rows[n] for n in names])  # R T 3 H W
    still = draw_grid(clips.unsqueeze(2), names, frame_labels(given_T), scale)[0]  # R T 1 3 H W
    n = given_T.shape[0]
    titles = [f"frame {t + 1}/{n}" + (" (given)" if bool(g) else "") for t, g in enumerate(given_T)]
    animated = draw_grid(clips.unsqueeze(1), names, [""], scale, titles=titles)  # R 1 T 3 H W
    return still, animated
