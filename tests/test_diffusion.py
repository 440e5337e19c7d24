"""Schedules, loss and samplers, checked against closed forms and an exact oracle."""

from __future__ import annotations

import math

import pytest
import torch

from mardini.diffusion import FlowSchedule, VSchedule, masked_mse, sample_loop
from mardini.diffusion.loss import LOG_FLOOR


@pytest.mark.parametrize("schedule", [FlowSchedule(), VSchedule()], ids=["flow", "v"])
def test_split_inverts_add_noise(schedule):
    x, eps = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    t = torch.rand(3, 4) * 0.98 + 0.01
    x_t = schedule.add_noise(x, eps, t)
    x0, e0 = schedule.split(x_t, schedule.target(x, eps, t), t)
    torch.testing.assert_close(x0, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e0, eps, atol=1e-5, rtol=1e-5)
    a, b = schedule.coefficients(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(a, torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b, torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)


def test_logit_normal_times_concentrate_in_the_middle():
    t = FlowSchedule().sample_t(20000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01
    assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6  # uniform would give 0.5


@pytest.mark.parametrize("schedule", [FlowSchedule(), VSchedule()], ids=["flow", "v"])
def test_velocity_from_x0_splits_back_to_x0(schedule):
    x_t, x0 = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t = torch.tensor([[0.05, 0.5, 0.999], [0.3, 0.7, 0.9]])
    v = schedule.velocity_from_x0(x_t, x0, t)
    torch.testing.assert_close(schedule.split(x_t, v, t)[0], x0, atol=1e-4, rtol=1e-4)
    # Clean frames (t = 0, the references) stay finite.
    assert torch.isfinite(schedule.velocity_from_x0(x_t, x0, torch.zeros(2, 3))).all()


def test_log_reduction_weighs_every_clip_by_its_relative_error():
    pred = torch.zeros(2, 3, 1, 2, 2)
    target = torch.ones(2, 3, 1, 2, 2)
    target[1] *= 10.0  # clip 1's error is 100x clip 0's
    target[:, 0] = 1000.0  # reference frames do not count
    mask = torch.tensor([[True, False, False], [True, False, False]])
    expected = (math.log(1.0 + LOG_FLOOR) + math.log(100.0 + LOG_FLOOR)) / 2
    assert masked_mse(pred, target, mask, "log").item() == pytest.approx(expected, rel=1e-5)
    # Halving clip 0's error lowers the log loss as much as halving clip 1's; not so the mean.
    drops = {}
    for reduction in ("log", "mean"):
        base = masked_mse(pred, target, mask, reduction).item()
        for clip in (0, 1):
            halved = pred.clone()
            halved[clip] = target[clip] * (1 - math.sqrt(0.5))  # squared error x 0.5
            drops[reduction, clip] = base - masked_mse(halved, target, mask, reduction).item()
    assert drops["log", 0] == pytest.approx(drops["log", 1], rel=1e-2)
    assert drops["mean", 1] > 50 * drops["mean", 0]
    with pytest.raises(ValueError, match="reduction"):
        masked_mse(pred, target, mask, "sum")


def test_masked_mse_ignores_reference_frames():
    pred, target = torch.zeros(2, 3, 1, 2, 2), torch.ones(2, 3, 1, 2, 2)
    target[:, 0] = 100.0  # huge error on the reference frame
    mask = torch.tensor([[True, False, False], [True, False, False]])
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", [FlowSchedule(), VSchedule()], ids=["flow", "v"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_with_oracle_velocity_recovers_the_data(schedule, solver):
    """With the exact velocity of a single data point, the sampler must land on it."""
    data = torch.randn(1, 3, 2, 4, 4)
    mask = torch.tensor([[True, False, False]])

    def oracle(x_t, t_BT):
        a, b = schedule.coefficients(t_BT[..., None, None, None])
        eps = (x_t - a * data) / b.clamp_min(1e-8)
        return schedule.target(data, eps, t_BT)

    noise = torch.randn_like(data)
    out = sample_loop(oracle, schedule, data, mask, noise, steps=10, solver=solver)
    torch.testing.assert_close(out, data, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[:, 0], data[:, 0])


def test_sampler_rejects_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver"):
        sample_loop(
            lambda x, t: x,
            FlowSchedule(),
            torch.zeros(1, 2, 1, 1, 1),
            torch.tensor([[True, False]]),
            torch.zeros(1, 2, 1, 1, 1),
            solver="rk4",
        )


@pytest.mark.parametrize("cls", [FlowSchedule, VSchedule], ids=["flow", "v"])
def test_time_shift_moves_training_times_and_the_grid_towards_noise(cls):
    plain, shifted = cls(), cls(shift=3.0)
    torch.testing.assert_close(plain.grid(4), torch.linspace(1.0, 0.0, 5))
    grid = shifted.grid(4)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (grid[1:] < grid[:-1]).all()
    # Every inner time moves towards noise: t = 0.5 becomes 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert (grid[1:-1] > plain.grid(4)[1:-1]).all() and grid[2] == pytest.approx(0.75)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    t_plain, t_shift = plain.sample_t(20000, gen()), shifted.sample_t(20000, gen())
    assert (t_shift >= t_plain).all() and t_shift.mean() > t_plain.mean() + 0.1
    assert 0 < t_shift.min() and t_shift.max() < 1


def test_the_model_config_carries_the_shift_to_its_schedule():
    from mardini.config import ModelConfig
    from mardini.models import build_model

    assert build_model(ModelConfig(preset="debug", time_shift=3.0)).schedule.shift == 3.0
    assert build_model("debug").schedule.shift == 1.0
    with pytest.raises(ValueError, match="time_shift"):
        ModelConfig(preset="debug", time_shift=0.0)
