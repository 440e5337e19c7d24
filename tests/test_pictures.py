"""Labelled grids: cells where the layout says, nearest-neighbour upscaled, labels drawn in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mardini.eval.pictures import BACKGROUND, PAD, comparison, draw_grid, layout, save_gif
from pipelines.demo import write_summary

# 2 rows x 3 columns x 2 frames of 4x4 cells, each a flat colour that says where it belongs.
R, C, T, H, W, SCALE = 2, 3, 2, 4, 4, 3


def _cells() -> torch.Tensor:
    cells = torch.empty(R, C, T, 3, H, W)
    for i in range(R):
        for j in range(C):
            for k in range(T):
                colour = torch.tensor([i * 0.8 - 0.6, j * 0.6 - 0.9, k * 1.2 - 0.7])
                cells[i, j, k] = colour[:, None, None]
    return cells


def _ink(pixels: np.ndarray) -> int:
    """Pixels that are not background."""
    return int((pixels != np.array(BACKGROUND, dtype=np.uint8)).any(axis=-1).sum())


def test_grid_places_each_upscaled_cell_and_draws_every_label():
    rows, columns = ["ground truth", "model"], ["nearest", "blend", "x"]
    frames = draw_grid(_cells(), rows, columns, SCALE, titles=["frame 1/2", "frame 2/2"])
    geo = layout(rows, columns, (H, W), SCALE, titled=True)
    assert len(frames) == T
    for k, image in enumerate(frames):
        assert image.size == (geo.width, geo.height)
        pixels = np.asarray(image)
        for i in range(R):
            for j in range(C):
                x, y = geo.cell(i, j)
                block = pixels[y : y + H * SCALE, x : x + W * SCALE]
                assert block.shape == (H * SCALE, W * SCALE, 3)
                assert (block == block[0, 0]).all()  # flat: nearest-neighbour, no blur
                expected = ((_cells()[i, j, k, :, 0, 0] + 1) * 127.5).round().byte().numpy()
                assert (block[0, 0] == expected).all()
            # The row label, left of the row's cells.
            _, y = geo.cell(i, 0)
            assert _ink(pixels[y : y + H * SCALE, : geo.label_w]) > 10
        for j in range(C):
            x, _ = geo.cell(0, j)
            header = pixels[geo.header_h // 2 : geo.header_h, x : x + W * SCALE]
            assert _ink(header) > 5  # the column title
        assert _ink(pixels[: geo.header_h // 2, :]) > 10  # the frame's title
    # Different titles make different pictures; the cells alone differ too.
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[1]))


def test_grid_refuses_labels_that_do_not_match_the_cells():
    with pytest.raises(ValueError, match="row labels"):
        draw_grid(_cells(), ["one"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="titles"):
        draw_grid(_cells(), ["a", "b"], ["a", "b", "c"], titles=["only one"])


def test_comparison_has_frames_in_columns_and_an_animated_twin(tmp_path):
    frames = 5
    rows = {name: torch.rand(frames, 3, 8, 8) * 2 - 1 for name in ("ground truth", "model")}
    given = torch.tensor([True, False, False, False, True])
    still, animated = comparison(rows, given, scale=2)
    geo = layout(list(rows), ["1 given", "2", "3", "4", "5 given"], (8, 8), 2)
    assert still.size == (geo.width, geo.height)
    assert len(animated) == frames
    twin = layout(list(rows), [""], (8, 8), 2, titled=True)
    assert animated[0].size == (twin.width, twin.height)
    gif = save_gif(tmp_path / "a.gif", animated, fps=4)
    with Image.open(gif) as image:
        assert image.n_frames == frames and image.size == animated[0].size


def test_demo_summary_writes_the_four_rows(tmp_path):
    clip = torch.rand(8, 3, 32, 32) * 2 - 1
    png, gif = write_summary(clip, clip.flip(0), tmp_path)
    rows = ["ground truth", "nearest", "blend", "model"]
    geo = layout(rows, [str(t) for t in range(8)], (32, 32), 4)
    with Image.open(png) as image:
        assert image.size[1] == geo.height and image.size[0] >= 8 * (128 + PAD)
        pixels = np.asarray(image.convert("RGB"))
    # Row 0 is the ground truth itself, x4.
    x, y = geo.cell(0, 0)
    first = ((clip[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert (pixels[y : y + 128 : 4, x : x + 128 : 4] == first).all()
    with Image.open(gif) as image:
        assert image.n_frames == 8
