"""Learning-rate schedules of the draft trainers (pure: a step in, a learning rate out)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, model_validator

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


class LrScheduleFields(BaseModel):
    """The schedule fields the draft trainers' configs share; the config itself defines `lr` and `steps`."""

    lr_schedule: LrSchedule = Field("constant", description="constant, or cosine: a half cosine from lr to lr_min "
                                    "over the steps budget (needs steps)")
    warmup: int = Field(0, ge=0, description="steps of linear warm-up to lr")
    lr_min: float = Field(0.0, ge=0, description="the cosine schedule's floor, reached at the end of the steps budget")

    @model_validator(mode="after")
    def _check_schedule(self):
        if self.lr_schedule == "cosine" and self.steps is None:
            raise ValueError("lr_schedule cosine decays over the steps budget: give steps (or use constant)")
        return self

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based `step` (`scheduled_lr` with this config's fields)."""
        return scheduled_lr(step, self.lr, self.lr_schedule, self.steps, self.warmup, self.lr_min)


__all__ = ["SCHEDULE_DEFAULTS", "LrSchedule", "LrScheduleFields", "scheduled_lr"]
