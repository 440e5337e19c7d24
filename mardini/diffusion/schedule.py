"""Noise schedules behind one interface; time runs from t=0 (clean) to t=1 (pure noise).

Both schedules write ``x_t = a(t) x + b(t) eps`` and train the model to predict a velocity
``v``; both recover ``(x, eps)`` from ``(x_t, v)`` in closed form, so one deterministic
DDIM-style step serves both (for rectified flow it is exactly the Euler step).

- ``flow`` (rectified flow): a = 1 - t, b = t, v = eps - x. Training times are logit-normal
  (SD3), which puts more weight on the middle of the path where the task is hardest.
- ``v`` (the paper's): a = cos(pi t / 2), b = sin(pi t / 2), v = a eps - b x (Salimans & Ho);
  the paper does not give its schedule, we use this cosine one, with uniform training times.
"""

from __future__ import annotations

import math

import torch

# Smallest noise coefficient ``b(t)`` an x0 prediction is divided by (see velocity_from_x0).
MIN_NOISE = 1e-4


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``s t / (1 + (s - 1) t)``: keeps 0 and 1, moves every time between them
    towards noise for ``s > 1`` (identity for ``s = 1``)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class Schedule:
    """Interface: ``coefficients(t) -> (a, b)``, velocity target and inversion.

    ``shift`` (``ModelConfig.time_shift``) moves both the training times and the sampler's
    time grid towards high noise by ``shift_time``: more training and more sampling steps where
    the frames' content is decided, fewer on fine detail at low noise.
    """

    # dx_t/dt = velocity_scale * v, used by the Heun solver.
    velocity_scale: float = 1.0
    shift: float = 1.0

    def grid(self, steps: int, device=None) -> torch.Tensor:
        """The sampler's ``steps + 1`` times from 1 to 0 (evenly spaced, then shifted)."""
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), self.shift)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``a(t), b(t)`` with ``x_t = a x + b eps``."""
        raise NotImplementedError

    def sample_t(
        self, n: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """Draw ``n`` training times in (0, 1)."""
        raise NotImplementedError

    def add_noise(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for clean ``x``, noise ``eps`` and times ``t`` broadcast from the left."""
        a, b = self.coefficients(_expand(t, x))
        return a * x + b * eps

    def target(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity the model learns to predict."""
        raise NotImplementedError

    def split(
        self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recover the predicted clean sample and noise ``(x, eps)`` from ``x_t`` and ``v``."""
        raise NotImplementedError

    def velocity_from_x0(
        self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The velocity whose ``split`` gives back ``x0`` (for an x0-predicting model).

        ``eps = (x_t - a x0) / b``; ``b`` is floored at ``MIN_NOISE`` so clean frames (t = 0,
        the references) stay finite; above that floor ``split(x_t, v, t)[0] == x0``.
        """
        a, b = self.coefficients(_expand(t, x_t))
        eps = (x_t - a * x0) / b.clamp_min(MIN_NOISE)
        return self.target(x0, eps, t)


class FlowSchedule(Schedule):
    """Rectified flow with logit-normal training times."""

    velocity_scale = 1.0

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0):
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.shift = shift

    def coefficients(self, t):
        return 1.0 - t, t

    def sample_t(self, n, generator=None, device=None):
        z = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
        return shift_time(torch.sigmoid(z), self.shift).to(device)

    def target(self, x, eps, t):
        return eps - x

    def split(self, x_t, v, t):
        t = _expand(t, x_t)
        return x_t - t * v, x_t + (1.0 - t) * v


class VSchedule(Schedule):
    """Cosine schedule with v-prediction (the paper's objective)."""

    velocity_scale = math.pi / 2

    def __init__(self, shift: float = 1.0):
        self.shift = shift

    def coefficients(self, t):
        angle = t * (math.pi / 2)
        return torch.cos(angle), torch.sin(angle)

    def sample_t(self, n, generator=None, device=None):
        return shift_time(torch.rand(n, generator=generator), self.shift).to(device)

    def target(self, x, eps, t):
        a, b = self.coefficients(_expand(t, x))
        return a * eps - b * x

    def split(self, x_t, v, t):
        a, b = self.coefficients(_expand(t, x_t))
        return a * x_t - b * v, b * x_t + a * v


def build_schedule(objective: str, shift: float = 1.0) -> Schedule:
    """Schedule for a model config's ``objective`` (``flow`` or ``v``) and ``time_shift``."""
    if objective == "flow":
        return FlowSchedule(shift=shift)
    if objective == "v":
        return VSchedule(shift=shift)
    raise ValueError(f"unknown objective {objective!r}; use 'flow' or 'v'")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast ``t`` (shape B or B T) against ``like`` (B T C H W ...) from the left."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))
