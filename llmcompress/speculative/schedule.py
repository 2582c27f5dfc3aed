"""Learning-rate schedules of the draft trainers (pure: a step in, a learning rate out)."""

from __future__ import annotations

import math
from typing import Literal

LrSchedule = Literal["constant", "cosine"]
# the schedule fields' defaults: a checkpoint written before they existed was trained with these
SCHEDULE_DEFAULTS = {"lr_schedule": "constant", "warmup": 0, "lr_min": 0.0}


def scheduled_lr(step: int, lr: float, schedule: LrSchedule = "constant", steps: int | None = None,
                 warmup: int = 0, lr_min: float = 0.0) -> float:
    """The learning rate of 0-based `step`: a linear warm-up from lr / warmup to lr over the first `warmup` steps,
    then `lr` (constant) or a half cosine from `lr` at the warm-up's end to `lr_min` at `steps` (cosine).
    Steps past `steps` keep `lr_min`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"lr schedule {schedule!r} is not one of constant, cosine")
    if steps is None:
        raise ValueError("a cosine learning-rate schedule decays over a step budget: give steps")
    span = max(steps - warmup, 1)
    t = min((step - warmup) / span, 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t))


__all__ = ["SCHEDULE_DEFAULTS", "LrSchedule", "scheduled_lr"]
