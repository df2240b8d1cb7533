"""The learning-rate schedule of a step: the one place that decides epochs, lr, warmup and decay per step.

The recipe gives epochs and decay epochs sized for its dataset; a step whose data is much smaller (a new
defect with 100 labelled images) would then run a few dozen iterations and stop undertrained. So the rule
adapts to the step's data: a step whose recipe epochs come to fewer than `train.min_iters` iterations
trains exactly `min_iters` iterations (its last epoch stops part-way) and decays at the same fractions of
them. Exactly, not rounded up to whole epochs: every stretched step of a protocol (teacher, joint, each
method) then gets the same budget, whatever its number of images. The warmup stays in iterations, and a
run resumed with more epochs keeps the schedule it started with.
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
    total_iters: int = 0  # a stretched step stops after exactly this many iterations (0: after `epochs` whole epochs)
    milestone_iters: tuple[int, ...] = ()  # a stretched step decays at these iterations instead of `milestones`

    def factor(self, it: int, iters_per_epoch: int) -> float:
        """lr multiplier at iteration `it`: linear warmup over iterations, then x gamma at each decay point."""
        if self.total_iters:
            f = self.gamma ** sum(it >= m for m in self.milestone_iters)
        else:
            epoch = it // max(iters_per_epoch, 1)
            f = self.gamma ** sum(epoch >= m for m in self.milestones)
        if it < self.warmup_iters:
            f *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        return f


def step_schedule(cfg: Config, with_teacher: bool, iters_per_epoch: Optional[int] = None) -> Schedule:
    """The schedule of a step; with `iters_per_epoch` it is adapted to the step's data (see the module docstring).

    A step with a teacher (finetune, erd, sdidd) uses the `incremental.*` values where set; others use `train.*`.
    A `two-models` step (`incremental.method`) trains at `incremental.two_models_lr`, by default the base lr.
    """
    t, inc = cfg.train, cfg.incremental
    epochs, lr, milestones = t.epochs, t.lr, tuple(t.milestones)
    if with_teacher:
        epochs = inc.epochs or epochs
        # The incremental lr is low to keep distillation stable and the old classes in place; a two-models step
        # distils nothing and its old model stays frozen beside it, so its fine-tune learns at the base lr.
        lr = (inc.two_models_lr or lr) if inc.method == "two-models" else (inc.lr or lr)
        milestones = tuple(inc.milestones) if inc.milestones is not None else milestones
    if iters_per_epoch is None:
        return Schedule(epochs, lr, milestones, t.warmup_iters, t.warmup_ratio, t.gamma)
    if epochs * iters_per_epoch >= t.min_iters:
        return Schedule(epochs, lr, milestones, t.warmup_iters, t.warmup_ratio, t.gamma)
    total = t.min_iters
    decay = tuple(sorted({max(1, round(m / epochs * total)) for m in milestones}))
    stretched = math.ceil(total / max(iters_per_epoch, 1))
    # Decay epochs do not apply: the step decays at iterations (milestone_iters).
    return Schedule(stretched, lr, (), t.warmup_iters, t.warmup_ratio, t.gamma, recipe_epochs=epochs, total_iters=total,
                    milestone_iters=decay)


def iterations(schedule: Schedule, iters_per_epoch: int) -> int:
    """How many iterations the step trains in all."""
    return schedule.total_iters or schedule.epochs * iters_per_epoch


def describe(schedule: Schedule, iters_per_epoch: int, images: int, min_iters: int) -> str:
    """One line saying how long the step trains and why (stretched to train.min_iters, or as the recipe says)."""
    total = iterations(schedule, iters_per_epoch)
    if schedule.recipe_epochs:
        return (f"{images} training images, {iters_per_epoch} iterations/epoch: {total} iterations "
                f"({total / max(iters_per_epoch, 1):.2f} epochs), lr {schedule.lr:g}, decay at iterations "
                f"{list(schedule.milestone_iters)}, warmup {schedule.warmup_iters} iterations (the recipe's "
                f"{schedule.recipe_epochs} epochs would be {schedule.recipe_epochs * iters_per_epoch} iterations: "
                f"stretched to exactly train.min_iters={min_iters}, decay at the same fractions)")
    return (f"{images} training images, {iters_per_epoch} iterations/epoch: {schedule.epochs} epochs = {total} iterations, "
            f"lr {schedule.lr:g}, decay at epochs {list(schedule.milestones)}, warmup {schedule.warmup_iters} iterations")


def log_schedule(schedule: Schedule, iters_per_epoch: int, images: int, min_iters: int, what: str) -> None:
    """Log the step's schedule at the start; warn when it is too short for its data."""
    log.info(f"{what}: {describe(schedule, iters_per_epoch, images, min_iters)}")
    total = iterations(schedule, iters_per_epoch)
    if total < TOO_FEW_ITERS:
        log.warning(f"warning: {what} trains only {total} iterations, too few to learn new classes reliably "
                    f"(set train.min_iters to 500, its default, or raise the epochs)")
