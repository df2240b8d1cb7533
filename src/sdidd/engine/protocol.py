"""Runs made of steps: plain (joint) training, and the class-incremental protocol chaining teacher -> student."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config, protocol_groups
from ..errors import SdiddError
from .checkpoint import load_checkpoint
from .data_setup import load_split
from .trainer import StepResult, StepSpec, _check_teacher, model_from_checkpoint, print_result, train_step


def dataset_classes(cfg: Config) -> list[str]:
    """Class names of the configured dataset, in its order."""
    return list(load_split(cfg.data, cfg.data.train_split, report=False).classes)  # train_step reports skipped items once


def run_train(cfg: Config) -> StepResult:
    """Plain training on `data.classes` (default: all classes) with every label."""
    classes = dataset_classes(cfg)
    chosen = cfg.data.classes or classes
    for c in chosen:
        if c not in classes:
            raise SdiddError(f"config key 'data.classes': {c!r} is not a class of {cfg.data.dataset} ({', '.join(classes)})")
    result = train_step(cfg, StepSpec(list(chosen), list(chosen), "joint", 0), cfg.train.out_dir)
    print_result(result.metrics, f"{cfg.name}: last epoch, test split")
    return result


def step_specs(groups: list[list[str]], method: str) -> list[StepSpec]:
    """Step 0 trains the first group; step k adds group k with `method`."""
    specs: list[StepSpec] = []
    seen: list[str] = []
    for k, g in enumerate(groups):
        seen = seen + list(g)
        if k == 0:
            specs.append(StepSpec(list(seen), list(g), "base", 0))
        elif method == "joint":  # upper bound: every label of every class seen so far
            specs.append(StepSpec(list(seen), list(seen), "joint", k))
        else:
            specs.append(StepSpec(list(seen), list(g), method, k))
    return specs


def run_incremental(cfg: Config, method: Optional[str] = None, out_dir: Optional[str | Path] = None) -> list[StepResult]:
    """Run the protocol's steps in order; each incremental step's teacher is the previous step's model.

    With `incremental.teacher` set, the run starts at the step after the teacher's classes.
    Finished steps (a `last.pth` holding metrics) are reused when `train.resume` is true.
    """
    method = method or cfg.incremental.method
    out_dir = Path(out_dir or cfg.train.out_dir)
    groups = protocol_groups(cfg, dataset_classes(cfg))
    specs = step_specs(groups, method)
    teacher = None
    start = 0
    if cfg.incremental.teacher:
        state = load_checkpoint(cfg.incremental.teacher)
        n = len(state["classes"])
        matches = [k for k, s in enumerate(specs) if len(s.classes) == n]
        if not matches or matches[0] + 1 >= len(specs):
            raise SdiddError(f"{cfg.incremental.teacher}: teacher with {n} classes fits no step of protocol {groups}")
        start = cfg.incremental.start_step or matches[0] + 1
        _check_teacher(state, specs[start], cfg, cfg.incremental.teacher)
        teacher = model_from_checkpoint(state)
    results = []
    for spec in specs[start:]:
        step_dir = out_dir / f"step{spec.step}_{spec.method}"
        epochs = cfg.train.epochs if spec.step == 0 or spec.method == "joint" else (cfg.incremental.epochs or cfg.train.epochs)
        lr = cfg.train.lr if spec.step == 0 or spec.method == "joint" else (cfg.incremental.lr or cfg.train.lr)
        result = train_step(cfg, spec, step_dir, teacher=None if spec.method in ("base", "joint") else teacher, epochs=epochs, lr=lr)
        print_result(result.metrics, f"step {spec.step} ({spec.method}): classes {spec.classes}, last epoch, test split")
        results.append(result)
        teacher = result.model
    return results
