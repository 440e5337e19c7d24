"""The CLI as a user runs it: `mardini demo` writes playable video, `mardini presets` prints counts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mardini.video import read_video


@pytest.mark.slow
def test_demo_writes_a_decodable_interpolation(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "demo",
            "--quick",
            "--out",
            str(out),
            "--steps",
            "5",
            "--sample-steps",
            "3",
            "--frames",
            "5",
            "--size",
            "32",
            "--preset",
            "debug",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    video = read_video(out / "interpolation.mp4")
    assert video.shape == (5, 3, 32, 32)
    side = read_video(out / "ground_truth_vs_interpolation.mp4")
    assert side.shape == (5, 3, 32, 64)
    assert "held-out loss" in result.stdout


def test_presets_command_prints_paper_sizes():
    result = subprocess.run(
        [sys.executable, "-m", "mardini.cli", "presets"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "paper-1b" in result.stdout and "3,221.9M" in result.stdout
