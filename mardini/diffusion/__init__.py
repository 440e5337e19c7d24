"""Noise schedules, the masked training loss and the samplers (no model code here)."""

from mardini.diffusion.loss import masked_mse
from mardini.diffusion.sampler import sample_loop
from mardini.diffusion.schedule import FlowSchedule, Schedule, VSchedule, build_schedule

__all__ = ["FlowSchedule", "Schedule", "VSchedule", "build_schedule", "masked_mse", "sample_loop"]
