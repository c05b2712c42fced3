"""Per-optimizer-step hyperparameter schedules for DINO.

DINO precomputes per-epoch arrays; with the paper's 10 epochs and warm-ups counted in iterations those arrays
are too coarse, so every value here is a pure function of the optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ScheduleValues", "DINOSchedules", "cosine_schedule", "linear_warmup_then_constant"]


def cosine_schedule(
    step: int,
    total_steps: int,
    start: float,
    end: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warm-up from `warmup_start` to `start` over `warmup_steps`, then a half cosine from `start` to `end`.

    Step `warmup_steps` is the first cosine step and has the value `start`; the cosine reaches `end` one step
    after the last step, as in DINO, so the last trained step is still (slightly) above `end`.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    step = min(max(step, 0), total_steps - 1)
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """`start` at step 0, rising linearly to `end` at `warmup_steps`, then constant (the teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * max(step, 0) / warmup_steps


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    freeze_last_layer: bool


@dataclass(frozen=True)
class DINOSchedules:
    """Every scheduled hyperparameter of a run, evaluated at an optimizer step with `at(step)`."""

    total_steps: int
    lr: float
    min_lr: float
    lr_warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int

    def at(self, step: int) -> ScheduleValues:
        return ScheduleValues(
            lr=cosine_schedule(step, self.total_steps, self.lr, self.min_lr, self.lr_warmup_steps),
            weight_decay=cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            teacher_momentum=cosine_schedule(step, self.total_steps, self.momentum_teacher, 1.0),
            teacher_temp=linear_warmup_then_constant(
                step, self.teacher_temp_warmup_steps, self.warmup_teacher_temp, self.teacher_temp
            ),
            freeze_last_layer=step < self.freeze_last_layer_steps,
        )
