"""Runs made of steps: plain (joint) training, and the class-incremental protocol chaining teacher -> student."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from ..config import Config, protocol_groups
from ..data.formats import FORMATS, described_splits
from ..errors import SdiddError
from ..model.detector import GFL
from ..model.stack import ModelStack
from .build import StepSpec
from .checkpoint import check_fits, load_checkpoint, model_from_checkpoint
from .run_data import RunData, load_run_data
from . import distributed as dist
from .trainer import StepResult, log_result, train_step

log = logging.getLogger(__name__)


def run_train(cfg: Config, data: Optional[RunData] = None) -> StepResult:
    """Plain training on `data.classes` (default: all classes) with every label."""
    data = data or load_run_data(cfg.data)
    cfg = data.sized(cfg)  # the image sizes chosen from the data, when the recipe leaves them unset
    chosen = cfg.data.classes or data.classes
    for c in chosen:
        if c not in data.classes:
            raise SdiddError(f"config key 'data.classes': {c!r} is not a class of {cfg.data.dataset} ({', '.join(data.classes)})")
    result = train_step(cfg, StepSpec(list(chosen), list(chosen), "joint", 0), cfg.train.out_dir, data)
    log_result(result.metrics, f"{cfg.name}: last epoch, {evaluated_on(cfg)}")
    if dist.is_main():
        log.info(write_run_plots(result.checkpoint.parent))
    return result


def write_run_plots(out_dir: Path) -> str:
    """losses.png from log.csv and results.png from results.csv (when the run evaluated during training); one log line."""
    from ..plots import plot_results, plot_training_curves
    written = [out_dir / "last.pth"] + [p for p in (out_dir / "best.pth",) if p.is_file()]
    if (out_dir / "log.csv").is_file():
        written.append(plot_training_curves(out_dir / "log.csv", out_dir / "losses.png"))
    if (out_dir / "results.csv").is_file():
        written += [out_dir / "results.csv", plot_results(out_dir / "results.csv", out_dir / "results.png")]
    return "wrote " + ", ".join(str(p) for p in written)


def evaluated_on(cfg: Config) -> str:
    """What a run's numbers are measured on: the test split, the validation split `data.val_fraction` holds out,
    or a described dataset's val split when it has no test split."""
    if cfg.data.val_fraction:
        return "validation split"
    if cfg.data.dataset in FORMATS and "test" not in described_splits(vars(cfg.data)) and "val" in described_splits(vars(cfg.data)):
        return "val split (the dataset has no test split)"
    return "test split"


def step_specs(groups: list[list[str]], method: str, old_labels: bool = False) -> list[StepSpec]:
    """Step 0 trains the first group; step k adds group k with `method` (joint: every label seen so far).

    `old_labels` (incremental.old_labels): step k's images keep the labels of the classes seen before it.
    """
    specs: list[StepSpec] = []
    seen: list[str] = []
    for k, g in enumerate(groups):
        before, seen = list(seen), seen + list(g)
        if k == 0:
            specs.append(StepSpec(list(seen), list(g), "base", 0))
        elif method == "joint":  # upper bound: every label of every class seen so far
            specs.append(StepSpec(list(seen), list(seen), "joint", k, added=list(g)))
        else:
            specs.append(StepSpec(list(seen), list(g), method, k, labelled_old=before if old_labels else []))
    return specs


def run_steps(cfg: Config, data: RunData, specs: list[StepSpec], step_dir: Callable[[StepSpec], Path],
              teacher: Optional[GFL | ModelStack] = None, new_teacher_dir: Optional[Callable[[StepSpec], Optional[Path]]] = None) -> list[StepResult]:
    """Train `specs` in order; each step with old classes learns from the previous step's model (or `teacher`).

    `new_teacher_dir` says where a step's fine-tuned new-class teacher lives (`distill.new_teacher=finetune`).
    """
    results = []
    for spec in specs:
        nt_dir = new_teacher_dir(spec) if new_teacher_dir is not None else None
        result = train_step(cfg, spec, step_dir(spec), data, teacher=teacher if spec.num_old else None, new_teacher_dir=nt_dir)
        log_result(result.metrics, f"step {spec.step} ({spec.method}): classes {spec.classes}, last epoch, {evaluated_on(cfg)}")
        results.append(result)
        teacher = result.model
    return results


def run_incremental(cfg: Config, method: Optional[str] = None, out_dir: Optional[str | Path] = None,
                    data: Optional[RunData] = None) -> list[StepResult]:
    """Run the protocol's steps in order; each incremental step's teacher is the previous step's model.

    With `incremental.teacher` set, the run starts at the step after the teacher's classes.
    Finished steps (a `last.pth` holding metrics) are reused when `train.resume` is true.
    """
    method = method or cfg.incremental.method
    out = Path(out_dir or cfg.train.out_dir)
    data = data or load_run_data(cfg.data)
    cfg = data.sized(cfg)  # the image sizes chosen from the data, when the recipe leaves them unset
    groups = protocol_groups(cfg, data.classes)
    specs = step_specs(groups, method, cfg.incremental.old_labels)
    teacher, start = None, 0
    if cfg.incremental.teacher:
        state = load_checkpoint(cfg.incremental.teacher)
        n = len(state["classes"])
        matches = [k for k, s in enumerate(specs) if len(s.classes) == n]
        if not matches or matches[0] + 1 >= len(specs):
            raise SdiddError(f"{cfg.incremental.teacher}: teacher with {n} classes fits no step of protocol {groups}")
        start = cfg.incremental.start_step or matches[0] + 1
        spec = specs[start]
        check_fits(state, cfg.incremental.teacher, f"be the teacher of step {spec.step} ({spec.method})",
                   spec.classes[: spec.num_old], cfg.model.backbone)
        teacher = model_from_checkpoint(state)
    # A step's fine-tuned new-class teacher is the finetune method's run of that step when the teacher is shared.
    return run_steps(cfg, data, specs[start:], lambda s: out / f"step{s.step}_{s.method}", teacher,
                     lambda s: out / f"step{s.step}_finetune" if s.step == specs[start].step else None)
