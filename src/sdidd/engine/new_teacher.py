"""The new-class teacher of a step (``distill.new_teacher``): loaded from a checkpoint, or fine-tuned first.

``finetune`` trains a fine-tune of the old teacher on the step's own data (same images, schedule and
seed as the step; a finished one is reused, so the benchmark's `finetune` run of the same step serves).
Its cost is the extra training run and one more forward per iteration, both reported in the step's stats.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import Config, DistillConfig, replaced
from ..errors import SdiddError
from ..methods import resolved_distill
from ..model.detector import GFL
from .build import Step, StepSpec
from .checkpoint import load_checkpoint, model_from_checkpoint
from .incremental import freeze_teacher

log = logging.getLogger(__name__)


# Trains a step: (config, spec, output folder) -> its result with `.model`, `.stats`; the trainer passes its own.
StepTrainer = Callable[[Config, StepSpec, Path], Any]


def attach_new_teacher(step: Step, teacher: Optional[GFL], finetune_dir: Path, train: StepTrainer) -> None:
    """Give `step` its new-class teacher and that teacher's channels of the step's new classes (no-op when off).

    `train` trains the fine-tune when `distill.new_teacher=finetune` (passed in, so this module needs no trainer).
    """
    spec = step.spec
    if teacher is None or step.distill is None or spec.method in ("finetune", "joint", "two-models"):
        return
    source = resolved_distill(step.cfg, spec.method).new_teacher
    if source is None:
        return
    if source == "finetune":
        # a plain fine-tune: no distillation, no pseudo-labels
        cfg = replaced(dataclasses.replace(step.cfg, distill=DistillConfig()), {"incremental.method": "finetune"})
        result = train(cfg, dataclasses.replace(spec, method="finetune"), finetune_dir)
        log.info(f"new-class teacher of step {spec.step}: fine-tuned ({finetune_dir}), mAP50 {result.metrics.map50:.1f}")
        model, classes = result.model, list(spec.classes)
        step.stats["new_teacher_seconds"] = float(result.stats.get("train_seconds", 0.0))
    else:
        state = load_checkpoint(source)
        classes = list(state["classes"])
        missing = [c for c in spec.new_classes if c not in classes]
        if missing:
            raise SdiddError(f"{source}: cannot be the new-class teacher, it does not know {', '.join(missing)} "
                             f"(it knows {', '.join(classes)})")
        model = model_from_checkpoint(state)
    step.new_teacher = freeze_teacher(model.to(step.device))
    step.new_channels = torch.tensor([classes.index(c) for c in spec.new_classes], device=step.device)
    log.info(f"new-class teacher: {source} distils {', '.join(spec.new_classes)}")
