"""bench/gpu_suite.sh on a machine without a CUDA GPU: it stops at once and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the suite would run")
def test_gpu_suite_fails_clearly_without_a_gpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_suite.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA GPU is visible" in done.stderr
    assert "GPU_SUITE_SMOKE=1" in done.stderr  # it says what to do instead
    assert not list(tmp_path.iterdir())  # and measured nothing
