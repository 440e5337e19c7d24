"""Evaluation: held-out loss, frame metrics against baselines, FVD, and the stage gates."""

from mardini.eval.evaluate import (
    EvalResult,
    EvalSettings,
    evaluate,
    evaluate_final,
    load_results,
    log_to_mlflow,
    run_evaluation,
    settings_for,
    write_outputs,
)
from mardini.eval.gates import (
    GateReport,
    GateResult,
    UnknownMetricError,
    baseline_metric,
    check_gates,
    known_metrics,
    validate_gates,
)
from mardini.eval.heldout import GRID, grid_loss, heldout_loss
from mardini.eval.metrics import baseline, frechet_distance, psnr, ssim

__all__ = [
    "GRID",
    "EvalResult",
    "EvalSettings",
    "GateReport",
    "GateResult",
    "UnknownMetricError",
    "baseline",
    "baseline_metric",
    "check_gates",
    "evaluate",
    "evaluate_final",
    "frechet_distance",
    "grid_loss",
    "heldout_loss",
    "known_metrics",
    "load_results",
    "log_to_mlflow",
    "psnr",
    "run_evaluation",
    "settings_for",
    "ssim",
    "validate_gates",
    "write_outputs",
]
