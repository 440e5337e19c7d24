"""Typed configuration: model, data, stages and the curriculum, loaded from YAML.

Every model is pydantic with ``extra="forbid"`` so a typo is an error, not a silent default.
``load_config(path, overrides)`` applies dotted overrides (``stages.mar.steps=10``) to the raw
YAML before validation and raises ``ConfigError`` naming the file and the key path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


# ----------------------------------------------------------------------------- model


class PlannerConfig(_Strict):
    """MAR planner: a Llama-style bidirectional transformer over low-resolution latents."""

    depth: int = Field(2, ge=1)
    width: int = Field(64, ge=8)
    mlp: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    patch: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PlannerConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class GeneratorConfig(_Strict):
    """DM generator: a DiT-style denoiser over high-resolution latents."""

    depth: int = Field(2, ge=1)
    width: int = Field(64, ge=8)
    mlp: int = Field(256, ge=8)
    heads: int = Field(4, ge=1)
    patch: int = Field(2, ge=1)
    # "temporal": attention across frames at each spatial position (the paper's default DM);
    # "spatiotemporal": full attention over all tokens of all frames (the paper's /ST variant).
    attention: Literal["temporal", "spatiotemporal"] = "spatiotemporal"
    # A direct path from the reference frames to every generated frame (not in the paper):
    # each frame's nearest reference frame before and after it, with their distances, enter its
    # tokens as extra input channels, and the x0 prediction is their linear blend (a copy of
    # the one reference where a frame has one side only) plus learned corrections, per frame
    # and per pixel, that start at zero. Without it, reference content reaches a noised frame
    # only through attention that must first learn to route it, which small models trained
    # briefly never did (issue 12; measured with bench/quality.py). Needs ``prediction: x0``.
    reference_path: bool = False
    # With ``reference_path``: each of the two references is first warped along a motion field
    # that the generator predicts per token (bilinear, upsampled to pixels; zero at
    # initialisation, so an untrained model still predicts the plain blend). The blend of two
    # frames of a moving scene is a double exposure; a blend of motion-compensated references
    # is what interpolation networks (FILM, RIFE) build on. Not in the paper (issue 12).
    reference_motion: bool = False
    # With ``reference_path``, > 0: a classical motion search between the two references (for
    # each frame between them, every linear motion of up to this many latent pixels across the
    # gap, scored by how well the two references agree along it; bench/motion_bound.py) gives
    # the generator a third candidate, the motion-compensated blend, and a map of how clearly
    # the best motion beats none. Both enter the tokens; the x0 prediction adds the candidate's
    # difference to the blend with learned weights that start at zero. Not in the paper
    # (issue 12): what the search finds needs no training, what to trust of it does.
    reference_search: int = Field(default=0, ge=0, le=8)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GeneratorConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class AutoencoderConfig(_Strict):
    """Per-frame autoencoder: pixel space (identity) or a KL autoencoder (diffusers)."""

    kind: Literal["pixel", "kl"] = "pixel"
    latent_channels: int = Field(16, ge=1)
    # Each entry halves the resolution once after the first: 4 entries give 8x compression.
    block_out_channels: list[int] = Field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = Field(2, ge=1)
    # Latents are normalised as (z - shift) * scale before the diffusion models see them.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # A directory written by diffusers' save_pretrained, local or any fsspec URL (``s3://``);
    # never a hub id (no downloads from the hub at run time).
    path: str | None = None
    # A KL autoencoder with no ``path`` starts random: the stages after it must load one trained
    # by an earlier ``autoencoder`` stage (through ``init_from``), or say ``untrained: true`` to
    # learn in the latent space of random weights on purpose (tests, benchmarks).
    untrained: bool = False


class HeadConfig(_Strict):
    """The planner's pre-training head (dropped after the ``mar`` stage)."""

    # "projection": linear head + masked L2 reconstruction (the paper's);
    # "diffusion": a small MLP denoiser per token conditioned on the planner (as in MAR).
    kind: Literal["projection", "diffusion"] = "projection"
    depth: int = Field(2, ge=1)
    width: int = Field(128, ge=8)


class ModelConfig(_Strict):
    """The whole MarDini model. ``preset`` fills every field not given explicitly."""

    preset: str | None = None
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    # The planner sees the video downscaled by this factor (pixels) before encoding.
    planner_downscale: int = Field(2, ge=1)
    # "flow": rectified flow (x_t = (1-t) x + t eps, predict eps - x);
    # "v": the paper's v-prediction on a cosine schedule, sampled with DDIM.
    objective: Literal["flow", "v"] = "flow"
    # Moves training times and the sampler's time grid towards noise (SD3's shift,
    # s t / (1 + (s - 1) t); 1 = none). See mardini/diffusion/schedule.py.
    time_shift: float = Field(1.0, gt=0.0)
    # What the generator outputs: "velocity" (the paper's v; eps - x for rectified flow), or
    # "x0", the clean frames, turned into the velocity through the schedule (as in JiT, Li & He
    # 2025): at high noise a velocity model must reproduce its own noisy input exactly, and in
    # pixel space what it fails to reproduce stays in the sample as noise.
    prediction: Literal["velocity", "x0"] = "velocity"
    # Where the generator's loss is measured: "velocity" (the paper's) or "x0" (the clean
    # frames' error, every noise level weighted alike); and how the clips of a batch combine:
    # "mean" squared error, or "log": the mean over clips of log(MSE + 1e-3), so each clip's
    # *relative* error counts, as in a mean PSNR. With "mean", clips with fast motion (large,
    # irreducible errors) dominate and slow clips are never rendered precisely.
    loss_space: Literal["velocity", "x0"] = "velocity"
    loss_reduction: Literal["mean", "log"] = "mean"
    # Training only: the noisy input is made with ``eps + g xi`` (xi fresh noise, g this
    # value) while the target keeps ``eps``, so the generator learns from inputs a little off
    # the path, as its own samples are (Ning et al. 2023, input perturbation against exposure
    # bias; they use 0.1). 0: off.
    input_perturbation: float = Field(0.0, ge=0.0)
    # Probability of replacing the planning signals by the learned null during training (CFG).
    cfg_dropout: float = Field(0.1, ge=0.0, le=1.0)
    activation_checkpointing: bool = False
    # Attention kernel (mardini/models/attention.py): "sdpa" runs SDPA's fused kernels, with a
    # dense mask only where Identity Attention masks something; "flex" runs flex_attention
    # with a block mask, so no N x N mask exists at the paper's token counts (GPU training).
    attention_backend: Literal["sdpa", "flex"] = "sdpa"
    # torch.compile every transformer block (training, evaluation, generation) with this
    # backend: "inductor" for speed on a GPU, "aot_eager" to trace without code generation.
    compile: bool = False
    compile_backend: str = "inductor"

    @model_validator(mode="after")
    def _reference_path_predicts_x0(self) -> ModelConfig:
        if self.generator.reference_path and self.prediction != "x0":
            raise ValueError(
                "generator.reference_path adds reference frames to an x0 prediction: "
                "set prediction: x0 (or reference_path: false)"
            )
        if self.generator.reference_motion and not self.generator.reference_path:
            raise ValueError(
                "generator.reference_motion warps the reference path's frames: "
                "set generator.reference_path: true (or reference_motion: false)"
            )
        if self.generator.reference_search and not self.generator.reference_path:
            raise ValueError(
                "generator.reference_search adds a candidate to the reference path's blend: "
                "set generator.reference_path: true (or reference_search: 0)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        name = data["preset"]
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return _deep_merge(MODEL_PRESETS[name], data)


# Size presets. Counts (planner without its pre-training head) are pinned by tests.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Every test builds this one: a few thousand parameters per block, 32x32 pixels in seconds.
    "debug": {
        "planner": {"depth": 2, "width": 64, "mlp": 128, "heads": 4, "patch": 4},
        "generator": {"depth": 2, "width": 64, "mlp": 256, "heads": 4, "patch": 4},
        "autoencoder": {"kind": "pixel"},
        "head": {"kind": "projection", "depth": 2, "width": 64},
        "planner_downscale": 2,
    },
    # The CPU demo: the same shape of model at a size that trains in minutes on two cores.
    "tiny": {
        "planner": {"depth": 4, "width": 192, "mlp": 384, "heads": 6, "patch": 4},
        "generator": {"depth": 4, "width": 128, "mlp": 512, "heads": 4, "patch": 4},
        "autoencoder": {"kind": "pixel"},
        "head": {"kind": "diffusion", "depth": 2, "width": 128},
        "planner_downscale": 2,
    },
    # MAR-L (3.1B) + DM (288M), the paper's main model.
    "paper": {
        "planner": {"depth": 16, "width": 4096, "mlp": 8192, "heads": 32, "patch": 2},
        "generator": {"depth": 8, "width": 1024, "mlp": 4096, "heads": 16, "patch": 2},
        "autoencoder": {"kind": "kl", "latent_channels": 16},
        "head": {"kind": "projection"},
        "planner_downscale": 2,
        "objective": "v",
        "activation_checkpointing": True,
    },
    # MAR-S (1.3B) + DM (288M).
    "paper-s": {
        "planner": {"depth": 8, "width": 4096, "mlp": 4096, "heads": 32, "patch": 2},
        "generator": {"depth": 8, "width": 1024, "mlp": 4096, "heads": 16, "patch": 2},
        "autoencoder": {"kind": "kl", "latent_channels": 16},
        "head": {"kind": "projection"},
        "planner_downscale": 2,
        "objective": "v",
        "activation_checkpointing": True,
    },
    # MAR-L + a generator widened to about 1B parameters.
    "paper-1b": {
        "planner": {"depth": 16, "width": 4096, "mlp": 8192, "heads": 32, "patch": 2},
        "generator": {"depth": 8, "width": 1920, "mlp": 7680, "heads": 30, "patch": 2},
        "autoencoder": {"kind": "kl", "latent_channels": 16},
        "head": {"kind": "projection"},
        "planner_downscale": 2,
        "objective": "v",
        "activation_checkpointing": True,
    },
}


# ----------------------------------------------------------------------------- data & stages


class DataConfig(_Strict):
    """Where the training clips live and how they are cut."""

    dataset: str = "default"
    # fsspec URL of the shards; default is {store}/shards/{dataset}.
    shards: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    shuffle_buffer: int = Field(64, ge=1)
    # Independent seeded sample streams per rank; a resumed job's batches depend on it, so
    # change it only between stages (see mardini/data/loader.py).
    lanes: int = Field(8, ge=1)
    workers: int = Field(0, ge=0)
    # Batches each worker keeps ready (DataLoader prefetch_factor). Waiting batches sit in
    # /dev/shm: a stage refuses to start when its loaders' budget does not fit there.
    prefetch: int = Field(2, ge=1)
    seed: int = 0
    # Train on latents precomputed by `mardini prep latents` (under {shards}/latents/) instead
    # of decoding mp4 clips and running the autoencoder every step; eval still reads mp4.
    latents: bool = False
    # Mirror, reverse and recolour training clips (mardini/data/augment.py); pixel clips only:
    # with ``latents`` on, only time reversal applies (exact for a per-frame autoencoder).
    augment: bool = False
    # Debugging aid: train on the first batch over and over (a loss that does not fall here
    # means a bug, not a data problem).
    overfit_batch: bool = False


class MaskConfig(_Strict):
    """Which frames a training sample keeps as references."""

    # Task mixture; probabilities are normalised.
    tasks: dict[Literal["interpolation", "i2v", "expansion", "random"], float] = Field(
        default_factory=lambda: {"random": 1.0}
    )
    # Fraction of frames kept as references; at least one frame is always masked.
    keep: tuple[float, float] = (0.35, 1.0)

    @model_validator(mode="after")
    def _check(self) -> MaskConfig:
        lo, hi = self.keep
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"keep must satisfy 0 <= min <= max <= 1, got {self.keep}")
        if (
            not self.tasks
            or any(p < 0 for p in self.tasks.values())
            or sum(self.tasks.values()) <= 0
        ):
            raise ValueError(
                f"tasks must have non-negative probabilities summing > 0: {self.tasks}"
            )
        return self


class OptimizerConfig(_Strict):
    """AdamW with linear warm-up and cosine decay."""

    lr: float = Field(1.4e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)


class GateConfig(_Strict):
    """One evaluation gate: ``metric`` within ``min``/``max``, or ``beats`` a baseline."""

    metric: str
    min: float | None = None
    max: float | None = None
    beats: str | None = None
    margin: float = 0.0

    @model_validator(mode="after")
    def _one_rule(self) -> GateConfig:
        if self.min is None and self.max is None and self.beats is None:
            raise ValueError(f"gate on {self.metric!r} needs min, max or beats")
        return self


# The one table of stage kinds: what each trains, and so exports as its contribution (a later
# stage's init_from takes these parts from it). The model's, the trainer's and the FLOP
# counter's lists of kinds come from here.
TRAINED_PARTS: dict[str, tuple[str, ...]] = {
    "autoencoder": ("autoencoder",),
    "mar": ("planner", "planner_head"),
    "dm": ("generator",),
    "joint": ("planner", "generator"),
}
StageKind = Literal["autoencoder", "mar", "dm", "joint"]
assert set(get_args(StageKind)) == set(TRAINED_PARTS), "StageKind and TRAINED_PARTS differ"


class StageConfig(_Strict):
    """One curriculum stage: one training job with its own data shape, masks and gates."""

    @model_validator(mode="before")
    @classmethod
    def _init_from_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("init_from"), str):
            data = {**data, "init_from": [data["init_from"]]}
        return data

    name: str
    kind: StageKind
    # Earlier stages (or models:/name@alias URIs) whose final weights initialise this one, in
    # order: a joint stage starts from the planner of `mar` and the generator of `dm`.
    init_from: list[str] = Field(default_factory=list)
    steps: int = Field(100, ge=1)
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    # Weights and activations of the ZeRO-3 job: "auto" is bf16 on a GPU and fp32 on CPU.
    # Under bf16 the optimizer keeps fp32 master weights, and the export is made from them.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    frames: int = Field(4, ge=2)
    resolution: int = Field(32, ge=8)
    fps: float = Field(8.0, gt=0)
    # This stage's own dataset: a name under {store}/shards/ or an fsspec URL (it has a "/").
    # None: the curriculum's (data.shards, else data.dataset). A stage refuses a dataset whose
    # clips are smaller than its resolution, so stages at 512-1024 px name one cut at that size.
    dataset: str | None = None
    mask: MaskConfig = Field(default_factory=MaskConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    # Overrides the model's generator attention for this stage (weights are shared).
    generator_attention: Literal["temporal", "spatiotemporal"] | None = None
    # The paper's recipe counts clips seen; kept for the record and for scaling steps.
    clips: int | None = None
    checkpoint_every: int = Field(50, ge=1)
    # Also save once this many minutes have passed since the last save (None: steps only). At
    # scale a save costs tens of seconds, so a wall-time interval bounds both the work lost to a
    # failure and the time spent saving, whatever the step time. Rank 0's clock decides for all.
    checkpoint_every_minutes: float | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    gates: list[GateConfig] = Field(default_factory=list)
    # After the gates pass: move the stage's alias at once (``auto``), or wait for a person to
    # approve or reject it in the Prefect UI or with ``mardini promote --approve`` (``manual``).
    # None: the curriculum's ``promotion``.
    promotion: Literal["auto", "manual"] | None = None


class SampleConfig(_Strict):
    """Sampling defaults for evaluation and generation."""

    steps: int = Field(25, ge=1)
    solver: Literal["euler", "heun"] = "euler"
    cfg_scale: float = Field(1.0, ge=0)


class CurriculumConfig(_Strict):
    """An ordered list of stages sharing one model, one dataset and one store."""

    name: str
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    stages: list[StageConfig]
    seed: int = 0
    # Every stage's promotion unless the stage says otherwise (see StageConfig.promotion), and
    # how long a manual stage waits for its decision before the flow fails.
    promotion: Literal["auto", "manual"] = "auto"
    approval_timeout_s: int = Field(7 * 24 * 3600, ge=1)
    # Where the resolved config came from; filled by load_config.
    source: str | None = None

    @model_validator(mode="after")
    def _init_from_earlier_stages(self) -> CurriculumConfig:
        seen: set[str] = set()
        for stage in self.stages:
            for source in stage.init_from:
                if not source.startswith("models:/") and source not in seen:
                    raise ValueError(
                        f"stage {stage.name!r} init_from {source!r}: not an earlier stage "
                        f"(earlier: {sorted(seen)}) nor a models:/name@alias URI"
                    )
            seen.add(stage.name)
        return self

    @model_validator(mode="after")
    def _autoencoder_is_trained(self) -> CurriculumConfig:
        autoencoder = self.model.autoencoder
        if autoencoder.kind != "kl" or autoencoder.path or autoencoder.untrained:
            return self
        trained: set[str] = set()  # stages whose weights hold a trained autoencoder
        for stage in self.stages:
            if stage.kind == "autoencoder" or any(
                s in trained or s.startswith("models:/") for s in stage.init_from
            ):
                trained.add(stage.name)
                continue
            raise ValueError(
                f"stage {stage.name!r} would learn in the latent space of a random, untrained KL "
                "autoencoder: add a stage of kind autoencoder before it and reach it through "
                "init_from (directly or through an earlier stage), set model.autoencoder.path "
                "to a trained one (a save_pretrained directory, local or s3://), or set "
                "model.autoencoder.untrained: true to do so on purpose"
            )
        return self

    @model_validator(mode="after")
    def _unique_stages(self) -> CurriculumConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {dupes}")
        if not self.stages:
            raise ValueError("a curriculum needs at least one stage")
        return self

    def promotion_of(self, name: str) -> str:
        """``auto`` or ``manual``: the stage's own setting, else the curriculum's."""
        return self.stage(name).promotion or self.promotion

    def stage(self, name: str) -> StageConfig:
        """Return the stage called ``name``; the error lists the stages that exist."""
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(
            f"{self.source or 'config'}: no stage {name!r}; stages are {[s.name for s in self.stages]}"
        )


# ----------------------------------------------------------------------------- loading


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``top`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(raw: dict[str, Any], override: str, source: str) -> None:
    """Set one ``dotted.key=value`` in ``raw``; list items are addressed by index or stage name."""
    if "=" not in override:
        raise ConfigError(f"{source}: override {override!r} must look like key.path=value")
    dotted, text = override.split("=", 1)
    value = yaml.safe_load(text) if text else None
    keys = dotted.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, key)
            if index is None:
                raise ConfigError(f"{source}: override key {where!r}: no item {key!r} in this list")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"{source}: override key {where!r}: parent is not a mapping or list")


def _list_index(items: list[Any], key: str) -> int | None:
    if key.lstrip("-").isdigit():
        index = int(key)
        return index if -len(items) <= index < len(items) else None
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    return None


def _key_path(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """Turn a pydantic error location into ``stages.mar.optimizer.lr`` (stage names, not indices)."""
    parts: list[str] = []
    node: Any = raw
    for item in loc:
        if isinstance(node, list) and isinstance(item, int):
            name = (
                node[item].get("name")
                if item < len(node) and isinstance(node[item], dict)
                else None
            )
            parts.append(str(name) if name else str(item))
            node = node[item] if item < len(node) else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> CurriculumConfig:
    """Load a curriculum YAML, apply dotted overrides and validate it."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found (looked for {path.resolve()})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override, source)
    raw["source"] = source
    try:
        cfg = CurriculumConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"{_key_path(e['loc'], raw) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None
    # A mistyped gate metric is refused here, not after the stage has trained. (Imported late:
    # the gates module reads GateConfig from this one.)
    from mardini.eval.gates import UnknownMetricError, validate_gates

    for stage in cfg.stages:
        try:
            validate_gates(stage.gates, where=f"stages.{stage.name}.gates")
        except UnknownMetricError as err:
            raise ConfigError(f"{source}: invalid config\n  {err}") from None
    return cfg


def model_config(preset: str, **fields: Any) -> ModelConfig:
    """Build a ``ModelConfig`` from a preset name plus field overrides (tests, benchmarks)."""
    return ModelConfig.model_validate({"preset": preset, **fields})
