"""The learning-rate schedule of a step: the one place that decides epochs, lr and decay epochs per step kind."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config


@dataclass(frozen=True)
class Schedule:
    """Epochs, peak lr, decay epochs and warmup of one step."""

    epochs: int
    lr: float
    milestones: tuple[int, ...]
    warmup_iters: int
    warmup_ratio: float
    gamma: float

    def factor(self, it: int, iters_per_epoch: int) -> float:
        """lr multiplier at iteration `it`: linear warmup over iterations, then x gamma at each milestone epoch."""
        epoch = it // max(iters_per_epoch, 1)
        f = self.gamma ** sum(epoch >= m for m in self.milestones)
        if it < self.warmup_iters:
            f *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        return f


def step_schedule(cfg: Config, with_teacher: bool) -> Schedule:
    """A step with a teacher (finetune, erd, sdidd) uses the `incremental.*` values where set; others use `train.*`."""
    t, inc = cfg.train, cfg.incremental
    epochs, lr, milestones = t.epochs, t.lr, t.milestones
    if with_teacher:
        epochs = inc.epochs or epochs
        lr = inc.lr or lr
        milestones = inc.milestones if inc.milestones is not None else milestones
    return Schedule(epochs, lr, tuple(milestones), t.warmup_iters, t.warmup_ratio, t.gamma)
