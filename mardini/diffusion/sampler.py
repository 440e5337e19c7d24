"""Deterministic samplers over the schedule's time grid from t=1 (noise) to t=0 (clean).

``euler`` is the DDIM step written through the schedule's (x, eps) inversion, which for
rectified flow is exactly Euler; ``heun`` adds a second-order correction (one extra model call
per step, none on the last). Reference frames are held clean at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mardini.diffusion.schedule import Schedule

# (x_t, t per frame B T) -> velocity
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_loop(
    velocity: VelocityFn,
    schedule: Schedule,
    reference: torch.Tensor,
    frame_mask: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 25,
    solver: str = "euler",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` to a sample; frames with ``frame_mask`` True stay ``reference``.

    ``reference``/``noise``: B T C H W latents; ``frame_mask``: B T bool.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r}; use 'euler' or 'heun'")
    keep = frame_mask.reshape(frame_mask.shape + (1,) * (reference.dim() - 2))
    x = torch.where(keep, reference, noise)
    grid = schedule.grid(steps, device=noise.device)

    def frame_times(t: torch.Tensor) -> torch.Tensor:
        # Reference frames are clean: they are seen at t = 0 whatever the step.
        return torch.where(frame_mask, torch.zeros_like(t), t.expand_as(frame_mask).to(noise.dtype))

    def ddim_step(x_t, v, t, s):
        x0, eps = schedule.split(x_t, v, frame_times(t))
        a, b = schedule.coefficients(s)
        return a * x0 + b * eps

    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        v = velocity(x, frame_times(t))
        x_next = ddim_step(x, v, t, s)
        if solver == "heun" and i < steps - 1:
            v_next = velocity(torch.where(keep, reference, x_next), frame_times(s))
            # dx/dt = scale * v: average the slopes at both ends of the step.
            x_next = x + (s - t) * schedule.velocity_scale * 0.5 * (v + v_next)
        x = torch.where(keep, reference, x_next)
        if progress is not None:
            progress(i + 1)
    return x
