"""The learning-rate schedule of a step: the one place that decides epochs, lr, warmup and decay per step.

The recipe gives epochs and decay epochs sized for its dataset; a step whose data is much smaller (a new
defect with 100 labelled images) would then run a few dozen iterations and stop undertrained. So the rule
adapts to the step's data: it runs at least `train.min_iters` iterations (more epochs) and moves the decay
epochs by the same factor (decay points are fractions of the step). The warmup stays in iterations: a
step of at least `min_iters` iterations keeps it short, and a run resumed with more epochs keeps the
schedule it started with.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from ..config import Config

log = logging.getLogger(__name__)

TOO_FEW_ITERS = 300  # a step shorter than this is warned about (docs/results/neu-det_3+3_quick_new100.md)


@dataclass(frozen=True)
class Schedule:
    """Epochs, peak lr, decay epochs and warmup of one step (after adapting to its data, when it was given)."""

    epochs: int
    lr: float
    milestones: tuple[int, ...]
    warmup_iters: int
    warmup_ratio: float
    gamma: float
    recipe_epochs: int = 0  # the recipe's epochs before the step was stretched to train.min_iters (0: not stretched)

    def factor(self, it: int, iters_per_epoch: int) -> float:
        """lr multiplier at iteration `it`: linear warmup over iterations, then x gamma at each milestone epoch."""
        epoch = it // max(iters_per_epoch, 1)
        f = self.gamma ** sum(epoch >= m for m in self.milestones)
        if it < self.warmup_iters:
            f *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        return f


def step_schedule(cfg: Config, with_teacher: bool, iters_per_epoch: Optional[int] = None) -> Schedule:
    """The schedule of a step; with `iters_per_epoch` it is adapted to the step's data (see the module docstring).

    A step with a teacher (finetune, erd, sdidd) uses the `incremental.*` values where set; others use `train.*`.
    """
    t, inc = cfg.train, cfg.incremental
    epochs, lr, milestones = t.epochs, t.lr, tuple(t.milestones)
    if with_teacher:
        epochs = inc.epochs or epochs
        lr = inc.lr or lr
        milestones = tuple(inc.milestones) if inc.milestones is not None else milestones
    if iters_per_epoch is None:
        return Schedule(epochs, lr, milestones, t.warmup_iters, t.warmup_ratio, t.gamma)
    recipe_epochs = 0
    if epochs * iters_per_epoch < t.min_iters:
        recipe_epochs, epochs = epochs, math.ceil(t.min_iters / max(iters_per_epoch, 1))
        milestones = tuple(sorted({max(1, round(m * epochs / recipe_epochs)) for m in milestones}))
    return Schedule(epochs, lr, milestones, t.warmup_iters, t.warmup_ratio, t.gamma, recipe_epochs)


def describe(schedule: Schedule, iters_per_epoch: int, images: int, min_iters: int) -> str:
    """One line saying how long the step trains and why (stretched to train.min_iters, or as the recipe says)."""
    total = schedule.epochs * iters_per_epoch
    line = (f"{images} training images, {iters_per_epoch} iterations/epoch: {schedule.epochs} epochs = {total} iterations, "
            f"lr {schedule.lr:g}, decay at epochs {list(schedule.milestones)}, warmup {schedule.warmup_iters} iterations")
    if schedule.recipe_epochs:
        line += (f" (the recipe's {schedule.recipe_epochs} epochs would be {schedule.recipe_epochs * iters_per_epoch} "
                 f"iterations: stretched to train.min_iters={min_iters}, decay epochs scaled alike)")
    return line


def log_schedule(schedule: Schedule, iters_per_epoch: int, images: int, min_iters: int, what: str) -> None:
    """Log the step's schedule at the start; warn when it is too short for its data."""
    log.info(f"{what}: {describe(schedule, iters_per_epoch, images, min_iters)}")
    total = schedule.epochs * iters_per_epoch
    if total < TOO_FEW_ITERS:
        log.warning(f"warning: {what} trains only {total} iterations, too few to learn new classes reliably "
                    f"(set train.min_iters to 500, its default, or raise the epochs)")
