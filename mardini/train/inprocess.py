"""Train a stage in this process, without DeepSpeed, torchrun, checkpoints or tracking.

For measuring what training is worth (``bench/quality.py``, the learning test): the trainer's
model, loss, masks, loader, augmentation, optimizer and warm-up + cosine schedule, on one rank
whose batch is the batch of a ``ranks``-rank job. ``mardini train`` is the real thing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mardini.config import TRAINED_PARTS, CurriculumConfig, StageConfig
from mardini.data.augment import augment_clips
from mardini.eval.evaluate import EvalSettings, evaluate, stage_eval_settings
from mardini.layout import shards_url
from mardini.masking import MaskSampler
from mardini.models import MarDini, build_model
from mardini.train.engine import (
    freeze_for,
    lr_lambda,
    step_generator,
    train_batches,
)


@dataclass
class Trained:
    """A model after ``steps`` steps of a stage, how long that took, and its losses."""

    model: MarDini
    steps: int
    seconds: float
    losses: list[float]


def train_in_process(
    cfg: CurriculumConfig,
    stage: StageConfig,
    store: str,
    steps: int | None = None,
    ranks: int = 1,
    init: MarDini | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Trained:
    """Train ``stage`` for ``steps`` steps (default: its own; its schedule stretched to them),
    starting from ``init``'s weights (default: a fresh model)."""
    stage = stage.model_copy(update={"steps": stage.steps if steps is None else steps})
    batch = stage.micro_batch * stage.grad_accum * ranks
    data_stage = stage.model_copy(update={"micro_batch": batch, "grad_accum": 1})
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if init is not None:
        model.load_state_dict(init.state_dict())
    freeze_for(model, stage.kind)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=stage.optimizer.lr,
        betas=stage.optimizer.betas,
        weight_decay=stage.optimizer.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage))
    masks = MaskSampler(stage.mask.tasks, stage.mask.keep)
    batches = train_batches(cfg, data_stage, store, rank=0, world=1, start_step=0)
    kwargs = {}
    if stage.kind not in ("autoencoder", "mar") and stage.generator_attention:
        kwargs["attention"] = stage.generator_attention
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(stage.steps):
        gen = step_generator(cfg.seed, 0, step)
        video = next(batches)
        if cfg.data.augment:
            video = augment_clips(video, gen)
        mask = masks.sample(video.shape[0], video.shape[1], generator=gen)
        if stage.kind != "autoencoder":
            kwargs["generator"] = gen
        loss = model(video, mask, kind=stage.kind, **kwargs)["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{stage.name}: non-finite loss at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.optimizer.grad_clip)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
    model.eval()
    return Trained(model, stage.steps, time.perf_counter() - start, losses)


def start_from(
    cfg: CurriculumConfig,
    stage: StageConfig,
    store: str,
    ranks: int,
    cache: dict[str, MarDini],
    on_stage: Callable[[str, int], None] | None = None,
) -> MarDini | None:
    """The model ``stage`` starts from: its ``init_from`` stages trained here in order; later
    sources overwrite the parts they trained, as the trainer's ``load_init`` does."""
    model = None
    for name in stage.init_from:
        if name.startswith("models:/"):
            raise ValueError(f"{stage.name}: in-process training starts from stages, not {name}")
        if name not in cache:
            source = cfg.stage(name)
            base = start_from(cfg, source, store, ranks, cache, on_stage)
            if on_stage:
                on_stage(name, source.steps)
            cache[name] = train_in_process(cfg, source, store, None, ranks, base).model
        trained = cache[name]
        if model is None:
            model = build_model(cfg.model)
            model.load_state_dict(trained.state_dict())
        else:
            parts = TRAINED_PARTS[cfg.stage(name).kind]
            state = {k: v for k, v in trained.state_dict().items() if k.split(".")[0] in parts}
            model.load_state_dict(state, strict=False)
    return model


def evaluate_held_out(
    cfg: CurriculumConfig, stage: StageConfig, model: MarDini, store: str, clips: int = 32
) -> dict[str, float]:
    """``mardini eval``'s metrics of ``model`` on the held-out split, at the stage's frames,
    resolution and fps and the config's sampler."""
    settings = EvalSettings(**stage_eval_settings(cfg, stage.name), max_clips=clips, samples=0)
    meta = {"kind": stage.kind, "stage": stage.name}
    return evaluate(model, meta, shards_url(cfg, store, stage), settings).metrics
