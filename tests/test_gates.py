"""Stage gates: min/max, beats a baseline (with margin), missing and unknown metrics."""

from __future__ import annotations

import math

import pytest

from mardini.config import GateConfig, load_config
from mardini.eval.gates import (
    UnknownMetricError,
    baseline_metric,
    check_gates,
    higher_is_better,
    known_metrics,
    validate_gates,
)
from tests.conftest import CONFIGS

RESULTS = {
    "heldout_loss": 0.25,
    "interp_psnr": 24.0,
    "baseline_nearest_interp_psnr": 20.0,
    "baseline_blend_interp_psnr": 23.5,
    "interp_ssim": 0.70,
    "baseline_nearest_interp_ssim": 0.60,
    "baseline_blend_interp_ssim": 0.75,
    "fvd_interp": "not configured: no I3D TorchScript file given",
}


def _gate(**fields) -> GateConfig:
    return GateConfig(**fields)


def test_min_and_max_pass_and_fail_with_value_and_threshold():
    report = check_gates(
        [
            _gate(metric="heldout_loss", max=0.5),
            _gate(metric="interp_psnr", min=25.0),
        ],
        RESULTS,
        stage="dm",
    )
    assert not report.passed
    ok, bad = report.results
    assert (ok.metric, ok.rule, ok.value, ok.threshold, ok.passed) == (
        "heldout_loss",
        "max",
        0.25,
        0.5,
        True,
    )
    assert (bad.metric, bad.rule, bad.value, bad.threshold, bad.passed) == (
        "interp_psnr",
        "min",
        24.0,
        25.0,
        False,
    )
    assert report.failures == [bad]
    text = str(report)
    assert "stage 'dm': FAILED" in text
    assert "PASS heldout_loss = 0.25: max 0.5" in text
    assert "FAIL interp_psnr = 24: min 25" in text


def test_bounds_are_inclusive_and_both_rules_of_one_gate_are_checked():
    report = check_gates([_gate(metric="heldout_loss", min=0.25, max=0.25)], RESULTS)
    assert report.passed and [r.rule for r in report.results] == ["min", "max"]
    report = check_gates([_gate(metric="heldout_loss", min=0.3, max=1.0)], RESULTS)
    assert [r.passed for r in report.results] == [False, True] and not report.passed


def test_beats_compares_with_the_named_baseline_and_margin():
    beats_nearest = _gate(metric="interp_psnr", beats="nearest", margin=3.0)
    report = check_gates([beats_nearest], RESULTS)
    assert report.passed
    (result,) = report.results
    assert result.rule == "beats nearest" and result.threshold == 23.0
    assert "baseline_nearest_interp_psnr 20" in result.detail
    # 24 > 23.5 passes without margin, fails with one of 1 dB.
    assert check_gates([_gate(metric="interp_psnr", beats="blend")], RESULTS).passed
    assert not check_gates([_gate(metric="interp_psnr", beats="blend", margin=1.0)], RESULTS).passed
    # SSIM below the blend baseline fails; a tie does not beat.
    assert not check_gates([_gate(metric="interp_ssim", beats="blend")], RESULTS).passed
    tie = {**RESULTS, "interp_ssim": 0.75}
    assert not check_gates([_gate(metric="interp_ssim", beats="blend")], tie).passed


def test_missing_or_not_configured_metric_fails_with_the_reason():
    report = check_gates(
        [_gate(metric="fvd_interp", max=500.0), _gate(metric="i2v_psnr", min=10.0)], RESULTS
    )
    fvd, i2v = report.results
    assert not fvd.passed and fvd.value is None and "not configured" in fvd.detail
    assert not i2v.passed and "not in the results" in i2v.detail and "interp_psnr" in i2v.detail
    # A baseline that is missing fails too (it never passes by default).
    report = check_gates(
        [_gate(metric="i2v_psnr", beats="nearest")], {"i2v_psnr": 30.0, "heldout_loss": 0.1}
    )
    assert not report.passed and "baseline_nearest_i2v_psnr" in report.results[0].detail


def test_unknown_metric_or_baseline_is_a_clear_error():
    with pytest.raises(UnknownMetricError, match="interp_pnsr.*known metrics: .*interp_psnr"):
        check_gates([_gate(metric="interp_pnsr", min=1.0)], RESULTS, stage="joint")
    with pytest.raises(UnknownMetricError, match="baselines are"):
        check_gates([_gate(metric="interp_psnr", beats="oracle")], RESULTS)
    with pytest.raises(UnknownMetricError, match="exist for"):
        validate_gates([_gate(metric="heldout_loss", beats="nearest")])


def test_infinite_and_nan_values():
    identical = {"ae_psnr": math.inf}
    assert check_gates([_gate(metric="ae_psnr", min=30.0)], identical).passed
    assert not check_gates([_gate(metric="ae_psnr", max=30.0)], identical).passed
    broken = {"heldout_loss": math.nan}
    assert not check_gates([_gate(metric="heldout_loss", max=10.0)], broken).passed
    assert not check_gates([_gate(metric="heldout_loss", min=0.0)], broken).passed


def test_naming_rule_and_directions():
    assert baseline_metric("interp_psnr", "nearest") == "baseline_nearest_interp_psnr"
    assert higher_is_better("interp_ssim") and higher_is_better("baseline_blend_i2v_psnr")
    assert not higher_is_better("heldout_loss") and not higher_is_better("fvd_i2v")
    names = known_metrics()
    assert len(names) == len(set(names)) and "baseline_blend_i2v_ssim" in names


def test_stage_without_gates_passes():
    report = check_gates([], RESULTS, stage="mar")
    assert report.passed and "no gates" in report.summary()


@pytest.mark.parametrize("config", ["tiny.yaml", "small.yaml", "paper.yaml"])
def test_shipped_configs_gate_on_known_metrics(config):
    cfg = load_config(CONFIGS / config)
    for stage in cfg.stages:
        where = f"{config}:{stage.name}"
        # A stage without gates passes unevaluated: every shipped stage has some.
        assert stage.gates, f"{where}: no gates"
        validate_gates(stage.gates, where=where)  # raises UnknownMetricError on a typo


def test_fvd_beats_a_baseline_when_lower():
    results = {"fvd_interp": 300.0, "baseline_blend_fvd_interp": 400.0}
    assert check_gates([_gate(metric="fvd_interp", beats="blend")], results).passed
    assert not check_gates(
        [_gate(metric="fvd_interp", beats="blend", margin=150.0)], results
    ).passed
    worse = {**results, "fvd_interp": 450.0}
    report = check_gates([_gate(metric="fvd_interp", beats="blend")], worse)
    assert not report.passed and "baseline_blend_fvd_interp" in report.results[0].detail
