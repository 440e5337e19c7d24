"""MarDini architecture: planner, generator, attention, and their composition."""

from __future__ import annotations

from mardini.config import MODEL_PRESETS as PRESETS
from mardini.config import ModelConfig
from mardini.models.attention import compile_blocks, set_attention_backend
from mardini.models.generator import Generator
from mardini.models.mardini import KINDS, MarDini
from mardini.models.planner import Planner


def build_model(model_cfg: ModelConfig | str) -> MarDini:
    """Build MarDini from a ``ModelConfig`` or a preset name (under ``torch.device`` context),
    with the configured attention backend and, if ``compile``, every block compiled."""
    if isinstance(model_cfg, str):
        model_cfg = ModelConfig(preset=model_cfg)
    model = MarDini(model_cfg)
    set_attention_backend(model, model_cfg.attention_backend)
    if model_cfg.compile:
        compile_blocks(model, backend=model_cfg.compile_backend)
    return model


__all__ = ["KINDS", "PRESETS", "Generator", "MarDini", "Planner", "build_model"]
