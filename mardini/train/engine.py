"""Train one curriculum stage as a DeepSpeed ZeRO-3 job (run under ``torchrun``).

The model code knows nothing of this: here live distributed start-up, the DeepSpeed config,
initialisation from earlier stages, checkpoint/resume, the training loop, tracking and the
consolidated export. Every rank runs the same code; rank 0 alone logs to MLflow and prints.

Determinism: frame masks, diffusion noise and guidance dropout of step ``s`` on rank ``r`` come
from a generator seeded with ``(seed, r, s)``, and the data loader resumes at ``s``; so a job
resumed from a checkpoint takes exactly the steps an uninterrupted job takes.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from mardini.config import TRAINED_PARTS, CurriculumConfig, StageConfig
from mardini.data.augment import augment_clips, reverse_some
from mardini.export import export_final, load_init
from mardini.layout import shards_url, stage_dir
from mardini.masking import MaskSampler
from mardini.models import MarDini, build_model
from mardini.models.flops import KIND_PARTS, mfu, train_flops
from mardini.progress import step_line
from mardini.storage import join, store_root
from mardini.train.checkpoint import CheckpointManager, TrainState
from mardini.train.faults import fault_point
from mardini.train.tracking import Tracker, git_commit

log = logging.getLogger(__name__)


# The exit status of a stage stopped by SIGTERM after saving (128 + 15, as a shell reports it).
STOPPED_EXIT = 143


class Stopped(RuntimeError):
    """SIGTERM reached a rank: every rank finished the step and saved; the job exits so a
    restart resumes there."""


class StopRequest:
    """Remembers a SIGTERM (a pod being stopped: Kubernetes signals torchrun, which signals its
    workers) instead of dying mid-step; the loop checks it once per step on every rank."""

    def __init__(self) -> None:
        import signal
        import threading

        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.warning("SIGTERM: finishing this step, saving a checkpoint, then exiting")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the stage and the step."""


@dataclass
class StageResult:
    """What a finished stage produced."""

    stage: str
    steps: int
    final_url: str
    run_id: str | None
    losses: dict[int, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- set-up


# On CPU (the laptop and CI path: small models, ranks sharing one machine's cores) ZeRO-3's
# per-module gather/release hooks cost more than the maths. Measured on tiny.yaml's
# joint-interpolation stage, 1 rank, 2 cores: plain PyTorch 0.68 s/step, ZeRO-2 0.67, ZeRO-3
# 1.10, and 1.04 with these two settings (parameters below the threshold stay whole on every
# rank, gradients and optimizer state are still partitioned; no autograd-function wrapper around
# every linear layer, which only saves activation memory). DeepSpeed 0.19's
# stage3_module_granularity_threshold, which would merge the hooks, fails on CPU tensors.
CPU_ZERO3 = {"stage3_param_persistence_threshold": 1_000_000, "memory_efficient_linear": False}


def uses_bf16(stage: StageConfig, on_gpu: bool) -> bool:
    """Whether the stage's job runs in bf16 (``precision``; ``auto``: on a GPU only)."""
    return stage.precision == "bf16" or (stage.precision == "auto" and on_gpu)


def deepspeed_config(stage: StageConfig, on_gpu: bool) -> dict:
    """The DeepSpeed config for a stage: ZeRO-3, clipping, accumulation, bf16 per ``uses_bf16``."""
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.optimizer.grad_clip,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": on_gpu,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
            **({} if on_gpu else CPU_ZERO3),
        },
        "bf16": {"enabled": uses_bf16(stage, on_gpu)},
        # Our optimizer is torch's AdamW: it runs on CPU and GPU alike (DeepSpeed's fused Adam
        # is CUDA-only), and ZeRO-3 partitions its state all the same.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(stage: StageConfig):
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    warmup, total, floor = stage.optimizer.warmup_steps, stage.steps, stage.optimizer.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def pick_accelerator(force_cpu: bool = False) -> bool:
    """True to run on CUDA. Otherwise ``DS_ACCELERATOR=cpu`` (unless set), which DeepSpeed reads
    and caches when it is imported: call this before importing deepspeed. The one place that
    decides it; launchers and pod specs leave it to the trainer (the CPU image also sets it)."""
    on_gpu = (
        not force_cpu
        and torch.cuda.is_available()
        and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    )
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return on_gpu


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up: nccl on GPU, gloo on CPU (``DS_ACCELERATOR=cpu``)."""
    if "RANK" not in os.environ:
        raise RuntimeError(
            "mardini.train runs under torchrun, e.g. `torchrun --nproc-per-node 2 -m mardini.train "
            "--config configs/tiny.yaml --stage mar` (DS_ACCELERATOR=cpu on a machine without GPUs)"
        )
    on_gpu = pick_accelerator()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The RNG of one (rank, step): masks, noise and dropout are reproducible on resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


def freeze_for(model: MarDini, kind: str) -> list[str]:
    """Make only the parts a stage kind trains require gradients; returns their names."""
    parts = TRAINED_PARTS[kind]
    for name, module in model.named_children():
        module.requires_grad_(name in parts)
    if kind == "autoencoder" and model.cfg.autoencoder.kind == "pixel":
        raise ValueError(
            "an autoencoder stage needs model.autoencoder.kind: kl (pixel space has no weights)"
        )
    return list(parts)


class DatasetResolutionError(ValueError):
    """A stage was pointed at clips smaller than it trains at (they would be upscaled)."""


def check_resolution(cfg: CurriculumConfig, stage: StageConfig, store: str) -> int:
    """The side of the stage's clips; raises, saying how to cut a dataset at the stage's
    resolution, when they are smaller than it (larger ones are downscaled: fine)."""
    from mardini.data.shards import clip_size, read_manifest

    url = shards_url(cfg, store, stage)
    size, where = clip_size(url, cfg.data.train_split)
    if size >= stage.resolution:
        return size
    # The new cut keeps the clips' frame rate and length, which the stages were set up for.
    prep = (read_manifest(url) or {}).get("config") or {}
    keep = "".join(f" --{key} {prep[key]:g}" for key in ("fps", "frames") if key in prep)
    out, _, name = url.rstrip("/").rpartition("/")
    # videos -> videos-512, videos-256 -> videos-512; a stage already naming videos-512 gets
    # it cut again.
    base, _, suffix = name.rpartition("-")
    new = f"{base if base and suffix.isdigit() else name}-{stage.resolution}"
    again = " --overwrite" if new == name else ""
    # A stage's dataset is a name under {store}/shards, or else a URL.
    ref = new if out == join(store, "shards") else join(out, new)
    raise DatasetResolutionError(
        f"stage {stage.name!r} trains at {stage.resolution} px but its dataset {url} holds "
        f"{size} px clips ({where}): they would be upscaled. Cut the videos at "
        f"{stage.resolution} px with `mardini prep shard <videos> --size {stage.resolution}{keep} "
        f"--out {out or '.'} --dataset {new}{again}`, then set stages.{stage.name}.dataset: {ref}"
    )


def latent_source(cfg: CurriculumConfig, stage: StageConfig, store: str, model: MarDini) -> str:
    """The latent cache this model can train from; raises saying how to write it if missing."""
    from mardini.autoencoder import fingerprint
    from mardini.data.latents import CACHE_RECORD, cache_url
    from mardini.storage import filesystem

    key = fingerprint(model.autoencoder, cfg.model.planner_downscale)
    url = cache_url(shards_url(cfg, store, stage), stage.resolution, key)
    fs, path = filesystem(join(url, CACHE_RECORD))
    if not fs.exists(path):
        source = f" --config {cfg.source}" if cfg.source else " --config <curriculum.yaml>"
        raise FileNotFoundError(
            f"data.latents is on but there is no latent cache for stage {stage.name!r} at {url} "
            f"(autoencoder fingerprint {key[:12]}, {stage.resolution} px): write it with "
            f"`mardini prep latents{source} --stage {stage.name}`, or set data.latents=false"
        )
    return url


def train_batches(
    cfg: CurriculumConfig,
    stage: StageConfig,
    store: str,
    rank: int,
    world: int,
    start_step: int,
    source: str | None = None,
    lane_states: dict[int, dict] | None = None,
    device: torch.device | None = None,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches for this rank from ``start_step`` on (one per micro-step): ``B T 3 H W``
    video (made from the workers' uint8 frames on ``device``), or ``(hi, lo)`` latents when
    ``source`` is a latent cache. ``lane_states`` (from the checkpoint resumed) makes the
    loader seek to ``start_step``, and holds the loader's position after every micro-batch
    handed out (``mardini.data.loader.train_loader``)."""
    from mardini.data import train_loader

    url = source or shards_url(cfg, store, stage)
    loader = train_loader(
        url,
        split=cfg.data.train_split,
        frames=stage.frames,
        resolution=stage.resolution,
        fps=stage.fps,
        micro_batch=stage.micro_batch,
        seed=cfg.data.seed + cfg.seed,
        rank=rank,
        world_size=world,
        start_step=0 if cfg.data.overfit_batch else start_step * stage.grad_accum,
        workers=cfg.data.workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        lanes=cfg.data.lanes,
        lane_states=None if cfg.data.overfit_batch else lane_states,
        prefetch=cfg.data.prefetch,
        device=device,
    )
    if cfg.data.overfit_batch:
        first = next(iter(loader))
        while True:
            yield first
    yield from loader


def check_loader_memory(
    cfg: CurriculumConfig, stage: StageConfig, store: str, source: str | None = None
) -> int:
    """Refuse to start when the loaders of this node's ranks would not fit its ``/dev/shm``;
    returns their budget in bytes (``mardini.data.loader.check_shm``). Called before any rank
    starts a loader, so the free space measured is what they will share."""
    from mardini.data.loader import check_shm, sample_bytes

    if cfg.data.workers == 0:
        return 0
    per_sample = sample_bytes(
        source or shards_url(cfg, store, stage),
        cfg.data.train_split,
        frames=stage.frames,
        resolution=stage.resolution,
        fps=stage.fps,
    )
    return check_shm(
        ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),  # set by torchrun
        workers=cfg.data.workers,
        prefetch=cfg.data.prefetch,
        batch=stage.micro_batch,
        sample_bytes=per_sample,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokens_per_sample(model: MarDini, stage: StageConfig) -> int:
    """Tokens one clip puts through the planner and/or the generator in this stage kind."""
    cfg, f = model.cfg, model.autoencoder.downsample
    hi = (stage.resolution // f // cfg.generator.patch) ** 2 * stage.frames
    lo = (stage.resolution // cfg.planner_downscale // f // cfg.planner.patch) ** 2 * stage.frames
    return {"mar": lo, "dm": hi, "joint": lo + hi, "autoencoder": hi}[stage.kind]


def flops_per_sample(model: MarDini, stage: StageConfig) -> int | None:
    """Analytic model FLOPs (forward + backward) of one clip in this stage; None for the
    autoencoder stage, which the count does not cover."""
    if stage.kind not in KIND_PARTS:
        return None
    return train_flops(
        model.cfg, stage.kind, stage.frames, stage.resolution, 1, stage.generator_attention
    )


# ----------------------------------------------------------------------------- the job


def train_stage(
    cfg: CurriculumConfig,
    stage_name: str,
    store: str | None = None,
    parent_run_id: str | None = None,
    config_path: str | None = None,
) -> StageResult:
    """Train ``stage_name`` of ``cfg`` to its last step (resuming if a checkpoint exists)."""
    import deepspeed

    stage = cfg.stage(stage_name)
    store = store_root(store)
    rank, world, device = init_distributed()
    on_gpu = device.type == "cuda"
    url = stage_dir(store, cfg.name, stage.name)
    # Before the model is built (minutes at scale): clips smaller than the stage are refused.
    check_resolution(cfg, stage, store)

    # A stage that has a checkpoint resumes from it: every weight, frozen ones included, is in
    # there, so init_from exports are not read again (each rank would download them whole).
    ckpt = CheckpointManager(
        url,
        rank,
        world,
        keep=stage.keep_checkpoints,
        every=stage.checkpoint_every,
        every_minutes=stage.checkpoint_every_minutes,
    )
    tag = ckpt.latest()
    # Identical initial weights on every rank before ZeRO-3 partitions them.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if stage.init_from and tag is None:
        load_init(model, stage.init_from, store, cfg.name)
    elif stage.init_from:
        # Except the autoencoder when training from latents: it picks the cache (fingerprint).
        only = ("autoencoder",) if cfg.data.latents and stage.kind != "autoencoder" else ()
        if only:
            load_init(model, stage.init_from, store, cfg.name, only=only)
        if rank == 0:
            log.info("resuming from %s: init_from (%s) not loaded%s", tag, ", ".join(stage.init_from), " but for the autoencoder" if only else "")  # fmt: skip
    parts = freeze_for(model, stage.kind)
    # Before ZeRO-3 partitions the weights: the cache must match this model's autoencoder.
    source = None
    if cfg.data.latents and stage.kind != "autoencoder":  # that stage needs pixels
        source = latent_source(cfg, stage, store, model)
    # Before deepspeed.initialize (a collective): no rank has started its loader yet.
    check_loader_memory(cfg, stage, store, source)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cfg = stage.optimizer
    optimizer = torch.optim.AdamW(
        params, lr=opt_cfg.lr, betas=opt_cfg.betas, weight_decay=opt_cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(stage, on_gpu),
    )

    state = TrainState()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and rank == 0:
        log.warning(
            "worker group restart %d of at most %s (a rank failed): resuming from the latest "
            "checkpoint", restarts, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"),
        )  # fmt: skip
    if tag is not None:
        state = ckpt.restore(engine, tag)
        if rank == 0:
            log.info("resumed %s/%s from %s at step %d", cfg.name, stage.name, tag, state.step)

    tracker = Tracker(enabled=rank == 0)
    run_id = tracker.start(
        cfg.name,
        stage.name,
        store,
        tags={
            "curriculum": cfg.name,
            "stage": stage.name,
            "kind": stage.kind,
            "git_commit": git_commit(),
        },
        run_id=state.mlflow_run_id,
        parent_run_id=parent_run_id or os.environ.get("MARDINI_PARENT_RUN_ID"),
    )
    state.mlflow_run_id = run_id if rank == 0 else None
    if rank == 0:
        tracker.params(
            {
                "stage": stage.model_dump(mode="json"),
                "model": cfg.model.model_dump(mode="json"),
                "data": cfg.data.model_dump(mode="json"),
                "world_size": world,
                "trained_parts": ",".join(parts),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            resolved = Path(tmp) / "resolved_config.yaml"
            resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            tracker.artifact(resolved, "config")
            if config_path and Path(config_path).is_file():
                tracker.artifact(config_path, "config")

    # The loader keeps its lanes' positions current in state.loader, which every checkpoint
    # saves (restored above on a resume).
    batches = train_batches(
        cfg, stage, store, rank, world, state.step, source, state.loader, device
    )
    trainer = Trainer(cfg, stage, engine, scheduler, batches, ckpt, tracker, state, device)
    try:
        losses = trainer.fit(StopRequest())
    except BaseException as exc:
        # The run says how the stage ended (a restart resumes it and sets it running again).
        tracker.end("KILLED" if isinstance(exc, Stopped | KeyboardInterrupt) else "FAILED")
        raise

    # Consolidate the ZeRO-3 shards into one set of full weights on rank 0.
    state = _gather_state(engine, rank)
    final_url = join(url, "final")
    if rank == 0:
        meta = {
            "curriculum": cfg.name,
            "stage": stage.name,
            "kind": stage.kind,
            "steps": stage.steps,
            "trained_parts": parts,
            "model": cfg.model.model_dump(mode="json"),
            # Frames, resolution, fps and masks: what eval and generation use by default.
            "stage_config": stage.model_dump(mode="json"),
            # The sampler it is evaluated and gated with: what generation and serving default to.
            "sample": cfg.sample.model_dump(mode="json"),
            "mlflow_run_id": run_id,
        }
        export_final(state, meta, url)
        tracker.metrics({"final_exported": 1.0}, step=stage.steps)
        tracker.end()
        log.info("stage %s finished: %s", stage.name, final_url)
    dist.barrier()
    return StageResult(stage.name, stage.steps, final_url, run_id, losses)


class Trainer:
    """One stage's training over a DeepSpeed engine: ``train_step`` runs one optimizer step
    (``grad_accum`` micro-batches) and returns the loss averaged over ranks; ``fit`` runs the
    steps from ``state.step`` to the stage's last, logs, and saves when the checkpoint manager
    says a checkpoint is due. ``state`` is what a checkpoint restores besides the engine."""

    def __init__(
        self,
        cfg: CurriculumConfig,
        stage: StageConfig,
        engine,
        scheduler,
        batches: Iterator,
        ckpt: CheckpointManager,
        tracker: Tracker,
        state: TrainState,
        device: torch.device,
    ):
        self.cfg, self.stage, self.engine, self.scheduler = cfg, stage, engine, scheduler
        self.batches, self.ckpt, self.tracker, self.state = batches, ckpt, tracker, state
        self.device = device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.masks = MaskSampler(stage.mask.tasks, stage.mask.keep)
        self.dtype = torch.bfloat16 if uses_bf16(stage, device.type == "cuda") else torch.float32
        self.kwargs: dict[str, Any] = {}
        if stage.kind not in ("autoencoder", "mar") and stage.generator_attention:
            self.kwargs["attention"] = stage.generator_attention

    def _micro_batch(self, gen: torch.Generator) -> tuple[Any, torch.Tensor, dict[str, Any]]:
        """The next clips (or cached latents), augmented, on the device, and their masks."""
        item = next(self.batches)
        kwargs = dict(self.kwargs)
        if self.stage.kind != "autoencoder":
            kwargs["generator"] = gen
        if isinstance(item, tuple):  # cached latents: the autoencoder is skipped
            hi, lo = (z.to(device=self.device, dtype=self.dtype, non_blocking=True) for z in item)
            if self.cfg.data.augment:
                hi, lo = reverse_some(hi, lo, gen)
            video, kwargs["latents"], (b, t) = None, (hi, lo), hi.shape[:2]
        else:
            if self.cfg.data.augment:
                item = augment_clips(item, gen)
            video = item.to(device=self.device, dtype=self.dtype, non_blocking=True)
            b, t = video.shape[:2]
        return video, self.masks.sample(b, t, generator=gen).to(self.device), kwargs

    def train_step(self, stop: StopRequest) -> tuple[float, bool, bool]:
        """One optimizer step at ``state.step``; returns the loss averaged over ranks, whether
        any rank was asked to stop, and whether rank 0's clock says a checkpoint is due (one
        all-reduce carries all three: every rank must stop and save at the same step)."""
        step, stage = self.state.step, self.stage
        fault_point(f"step:{step}")
        gen = step_generator(self.cfg.seed, self.rank, step)
        total = torch.zeros((), device=self.device)
        for _ in range(stage.grad_accum):
            video, mask, kwargs = self._micro_batch(gen)
            loss = self.engine(video, mask, kind=stage.kind, **kwargs)["loss"]
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float() / stage.grad_accum
        flags = torch.tensor(
            [float(stop.requested), float(self.ckpt.clock_due())], device=self.device
        )
        both = torch.cat([total[None], flags])
        dist.all_reduce(both)
        mean_loss = both[0].item() / self.world
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"stage {stage.name!r}: non-finite loss {mean_loss} at step {step + 1}; lower "
                f"stages.{stage.name}.optimizer.lr or check the data (last good checkpoint: "
                f"{self.ckpt.latest()})"
            )
        self.state.step = step + 1
        return mean_loss, both[1].item() > 0, both[2].item() > 0

    def fit(self, stop: StopRequest) -> dict[int, float]:
        """Train from ``state.step`` to the stage's last step; returns the losses by step. When
        ``stop`` has seen SIGTERM on any rank, every rank saves after the current step and
        ``Stopped`` is raised."""
        stage, start = self.stage, self.state.step
        meter = _Meter(self, start)
        progress = _Progress(self.rank == 0, stage, start)
        losses: dict[int, float] = {}
        self.engine.train()
        self.ckpt.start_clock()
        while self.state.step < stage.steps:
            mean_loss, stopping, clock = self.train_step(stop)
            done = self.state.step
            losses[done] = mean_loss
            if self.rank == 0 and (
                done % stage.log_every == 0 or done == stage.steps or done == start + 1
            ):
                self.tracker.metrics(meter.metrics(done, mean_loss), step=done)
            progress.update(done, mean_loss)
            if self.ckpt.due(done, stage.steps, stopping, clock):
                self.ckpt.save(self.engine, self.state)
            if stopping and done < stage.steps:
                progress.close()
                raise Stopped(f"stage {stage.name!r}: stopped by SIGTERM after step {done}; saved step-{done}")  # fmt: skip
        progress.close()
        return losses


class _Meter:
    """Rank 0's step metrics: loss, learning rate, gradient norm, throughput, memory, MFU."""

    def __init__(self, trainer: Trainer, start: int):
        self.trainer = trainer
        stage, module = trainer.stage, trainer.engine.module
        self.tokens = tokens_per_sample(module, stage)
        self.flops = flops_per_sample(module, stage)
        self.samples_per_step = stage.micro_batch * stage.grad_accum * trainer.world
        self.tick, self.last = time.perf_counter(), start

    def metrics(self, done: int, loss: float) -> dict[str, float]:
        t = self.trainer
        now = time.perf_counter()
        seconds = (now - self.tick) / (done - self.last)  # per step since the last log line
        self.tick, self.last = now, done
        grad_norm = t.engine.get_global_grad_norm()
        metrics = {
            "loss": loss,
            "lr": t.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": self.samples_per_step / seconds,
            "tokens_per_s": self.samples_per_step * self.tokens / seconds,
            "peak_memory_mb": peak_memory_mb(t.device),
        }
        if self.flops is not None:
            # Model FLOPs per device (mardini/models/flops.py); MFU where the peak is known.
            achieved = self.samples_per_step * self.flops / seconds / t.world
            metrics["tflops_per_s"] = achieved / 1e12
            utilisation = mfu(achieved, 1.0, t.device)
            if utilisation is not None:
                metrics["mfu"] = utilisation
        return metrics


def _gather_state(engine, rank: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on rank 0, module by module to bound memory: the optimizer's fp32
    master copy of every trained weight (under bf16 the module holds only a rounded copy of
    it), the gathered module weights of frozen parts. Every rank must call it (collectives)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, module in engine.module.named_modules():
        own = list(module.named_parameters(recurse=False))
        frozen = [p for _, p in own if not p.requires_grad]
        with deepspeed.zero.GatheredParameters(frozen, modifier_rank=None):
            for pname, param in own:
                # All-gathers the fp32 partitions of a trained weight; None for a frozen one.
                master = safe_get_full_fp32_param(param) if param.requires_grad else None
                if rank == 0:
                    value = master if master is not None else param.detach()
                    state[f"{name}.{pname}" if name else pname] = value.float().cpu().clone()
        if rank == 0:
            for bname, buf in module.named_buffers(recurse=False):
                if bname not in getattr(module, "_non_persistent_buffers_set", set()):
                    state[f"{name}.{bname}" if name else bname] = buf.detach().float().cpu().clone()
    return state


class _Progress:
    """A rich progress bar on an interactive rank 0; periodic log lines otherwise."""

    def __init__(self, enabled: bool, stage: StageConfig, start: int):
        self.enabled, self.stage, self.start, self.bar = enabled, stage, start, None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"[bold]{stage.name}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(stage.name, total=stage.steps, completed=start, loss="-")
            self.bar.start()

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")
        elif step % self.stage.log_every == 0 or step in (self.stage.steps, self.start + 1):
            # A launcher parses this line (mardini.progress) into the console's progress line;
            # the first step gives it a start for the ETA.
            log.info("%s", step_line(self.stage.name, step, self.stage.steps, loss))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
