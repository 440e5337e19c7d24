"""Stage gates: the ``gates:`` list of a stage, evaluated against an evaluation's metrics.

A gate is ``{metric, min, max, beats, margin}`` (``mardini.config.GateConfig``):
- ``min: x`` passes when ``value >= x``; ``max: x`` passes when ``value <= x``;
- ``beats: <baseline>`` compares ``metric`` with the metric named
  ``baseline_<baseline>_<metric>`` (``beats: nearest`` on ``interp_psnr`` compares with
  ``baseline_nearest_interp_psnr``) and passes when the model is better by more than
  ``margin``: ``value > base + margin`` for higher-is-better metrics (PSNR, SSIM),
  ``value < base - margin`` for lower-is-better ones (losses, FVD, seconds).

A gate naming a metric the platform does not know (a typo) raises ``UnknownMetricError``; a
known metric that is missing from the results, or present as a string saying why it was not
computed (FVD turned off, I2V on a ``mar`` stage), fails the gate with that reason; it
never passes. ``inf`` (identical frames) and ``nan`` compare as floats:
``nan`` fails every rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mardini.config import GateConfig
from mardini.eval.metrics import BASELINES

# Metric names an evaluation can produce, with the direction in which they improve.
HIGHER_IS_BETTER = (
    "interp_psnr",
    "interp_ssim",
    "i2v_psnr",
    "i2v_ssim",
    "interp_x0_psnr",
    "i2v_x0_psnr",
    "ae_psnr",
    "ae_ssim",
)
LOWER_IS_BETTER = (
    "heldout_loss",
    "fvd_interp",
    "fvd_i2v",
    "fvd_real_halves",
    "interp_seconds_per_frame",
    "i2v_seconds_per_frame",
)
MODEL_METRICS = HIGHER_IS_BETTER + LOWER_IS_BETTER
# Baselines exist for the frame-quality metrics of interpolation and image-to-video.
BASELINE_METRICS = ("interp_psnr", "interp_ssim", "i2v_psnr", "i2v_ssim", "fvd_interp", "fvd_i2v")
_BASELINE = re.compile(rf"^baseline_({'|'.join(BASELINES)})_(.+)$")


class UnknownMetricError(ValueError):
    """A gate names a metric (or baseline) that no evaluation produces."""


def baseline_metric(metric: str, baseline: str) -> str:
    """The name of ``baseline``'s value of ``metric``: ``baseline_<baseline>_<metric>``."""
    return f"baseline_{baseline}_{metric}"


def known_metrics() -> list[str]:
    """Every metric name a gate may use."""
    return list(MODEL_METRICS) + [
        baseline_metric(m, b) for b in BASELINES for m in BASELINE_METRICS
    ]


def higher_is_better(metric: str) -> bool:
    """Direction of improvement of a known metric (a baseline follows its metric)."""
    match = _BASELINE.match(metric)
    base = metric if match is None else match.group(2)
    if match is None or base in BASELINE_METRICS:
        if base in HIGHER_IS_BETTER:
            return True
        if base in LOWER_IS_BETTER:
            return False
    raise UnknownMetricError(
        f"unknown metric {metric!r} in a gate; known metrics: {', '.join(known_metrics())}"
    )


def validate_gates(gates: Iterable[GateConfig], where: str = "gates") -> None:
    """Raise ``UnknownMetricError`` naming ``where`` if a gate names no known metric/baseline."""
    for gate in gates:
        try:
            higher_is_better(gate.metric)
        except UnknownMetricError as err:
            raise UnknownMetricError(f"{where}: {err}") from None
        if gate.beats is not None:
            if gate.beats not in BASELINES or gate.metric not in BASELINE_METRICS:
                raise UnknownMetricError(
                    f"{where}: gate on {gate.metric!r} beats {gate.beats!r}: baselines are "
                    f"{list(BASELINES)} and exist for {list(BASELINE_METRICS)}"
                )


@dataclass(frozen=True)
class GateResult:
    """One rule of one gate: the metric, its value, the threshold and whether it passed."""

    metric: str
    rule: str  # "min", "max" or "beats <baseline>"
    value: float | None
    threshold: float | None
    passed: bool
    detail: str

    def line(self) -> str:
        """``PASS interp_psnr = 24.1 beats nearest (> 22.3 + 0)``-style summary."""
        value = "missing" if self.value is None else f"{self.value:.6g}"
        return f"{'PASS' if self.passed else 'FAIL'} {self.metric} = {value}: {self.detail}"


@dataclass(frozen=True)
class GateReport:
    """All gate results of a stage; ``passed`` when every rule passed (and there was one)."""

    stage: str
    results: tuple[GateResult, ...]

    @property
    def passed(self) -> bool:
        """True when every rule passed; a stage without gates passes."""
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[GateResult]:
        """The rules that failed."""
        return [r for r in self.results if not r.passed]

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """Multi-line text naming each metric, value, threshold and result."""
        head = f"gates of stage {self.stage!r}: {'PASSED' if self.passed else 'FAILED'}"
        if not self.results:
            return head + " (no gates)"
        return "\n".join([head, *("  " + r.line() for r in self.results)])

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "stage": self.stage,
            "passed": self.passed,
            "results": [r.__dict__ for r in self.results],
        }


def _missing(metric: str, results: Mapping[str, float | str]) -> str:
    """Why ``metric`` has no number: the reason string the evaluation left, or a listing."""
    reason = results.get(metric)
    if isinstance(reason, str):
        return f"{metric} {reason}"
    numbers = sorted(k for k, v in results.items() if not isinstance(v, str))
    return (
        f"{metric} not in the results (this evaluation produced: {', '.join(numbers) or 'nothing'})"
    )


def _number(value: float | str | None) -> float | None:
    if value is None or isinstance(value, str):
        return None
    return float(value)


def check_gates(
    gates: Iterable[GateConfig], results: Mapping[str, float | str], stage: str = "?"
) -> GateReport:
    """Evaluate ``gates`` on an evaluation's flat results (numbers, or strings saying why a
    metric was not computed). Raises ``UnknownMetricError`` on a metric no evaluation makes."""
    gates = list(gates)
    validate_gates(gates, where=f"stage {stage!r}")
    checks: list[GateResult] = []
    for gate in gates:
        rules: list[tuple[str, float | None]] = []
        if gate.min is not None:
            rules.append(("min", gate.min))
        if gate.max is not None:
            rules.append(("max", gate.max))
        if gate.beats is not None:
            rules.append((f"beats {gate.beats}", None))
        checks += [_check(gate, rule, bound, results) for rule, bound in rules]
    return GateReport(stage, tuple(checks))


def _check(
    gate: GateConfig, rule: str, bound: float | None, results: Mapping[str, float | str]
) -> GateResult:
    """Evaluate one rule of one gate."""
    value = _number(results.get(gate.metric))
    if value is None:
        return GateResult(gate.metric, rule, None, bound, False, _missing(gate.metric, results))
    if rule == "min":
        ok = value >= bound
        return GateResult(gate.metric, rule, value, bound, ok, f"min {bound:.6g} (needs >=)")
    if rule == "max":
        ok = value <= bound
        return GateResult(gate.metric, rule, value, bound, ok, f"max {bound:.6g} (needs <=)")
    base_name = baseline_metric(gate.metric, gate.beats)
    base = _number(results.get(base_name))
    if base is None:
        return GateResult(gate.metric, rule, value, None, False, _missing(base_name, results))
    if higher_is_better(gate.metric):
        threshold, how, ok = base + gate.margin, ">", value > base + gate.margin
    else:
        threshold, how, ok = base - gate.margin, "<", value < base - gate.margin
    detail = (
        f"beats {gate.beats}: needs {how} {base_name} {base:.6g} "
        f"{'+' if how == '>' else '-'} margin {gate.margin:g} = {threshold:.6g}"
    )
    return GateResult(gate.metric, rule, value, threshold, ok, detail)
