"""MarDini architecture: planner, generator, attention, and their composition."""

from __future__ import annotations

from mardini.config import MODEL_PRESETS as PRESETS
from mardini.config import ModelConfig
from mardini.models.generator import Generator
from mardini.models.mardini import KINDS, MarDini
from mardini.models.planner import Planner


def build_model(model_cfg: ModelConfig | str) -> MarDini:
    """Build MarDini from a ``ModelConfig`` or a preset name (under ``torch.device`` context)."""
    if isinstance(model_cfg, str):
        model_cfg = ModelConfig(preset=model_cfg)
    return MarDini(model_cfg)


__all__ = ["KINDS", "PRESETS", "Generator", "MarDini", "Planner", "build_model"]
