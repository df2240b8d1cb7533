"""Add defect classes to a trained model from a dataset that labels the new classes (and maybe old ones).

The student's classes are the teacher's followed by the new dataset's new ones; it trains on the new dataset's
images that hold a new-class box (and those without any box: background), from the new boxes and the boxes of
old classes the new data labels, with a distillation method (default `sdidd+`, see
docs/METHOD_NOTES.md; `sdidd` is the paper's), and
is evaluated on what the user holds: a test set labelled with every class, or the old test set (old
classes) plus the new dataset's test split (new classes). The result is a checkpoint like any other
step's, so it can be the teacher of the next run.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import Config, DataConfig, replaced
from ..device import select_device
from ..errors import SdiddError
from ..evaluate import EvalResult
from ..run_files import write_json
from .build import StepSpec
from .checkpoint import load_checkpoint, model_from_checkpoint
from .evaluation import evaluate_model
from .replay import offset_ids
from .run_data import RunData, channel_view, decode_once, load_run_data, load_split
from .trainer import StepResult, train_step

log = logging.getLogger(__name__)


@dataclass
class AddClassesResult:
    """The trained step and its table: per class, the teacher's and the student's AP50 and where each came from."""

    step: StepResult
    rows: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, float] = field(default_factory=dict)


def _ap(result: Optional[EvalResult], name: str) -> float:
    if result is None or name not in result.per_class:
        return float("nan")
    return result.per_class[name]["ap50"]


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def plan_classes(teacher_state: dict[str, Any], new_data: RunData,
                 teacher_path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(old classes, new classes, old classes the new data labels); one SdiddError line if nothing new has a box.

    The new dataset may name old classes too (a full ultralytics `names` list, or a line that labels every defect
    it sees): those with boxes are trained from their labels; those without are just names.
    """
    old = list(teacher_state["classes"])
    new = [c for c in new_data.classes if c not in old]
    if not new:
        raise SdiddError(f"{teacher_path}: the new dataset names no class the teacher does not know "
                         f"(teacher: {', '.join(old)}; new dataset: {', '.join(new_data.classes)})")
    counts = new_data.train.class_counts()
    if not any(counts.get(c) for c in new):
        raise SdiddError(f"the new dataset ({new_data.train.name}) holds no box of {', '.join(new)}")
    labelled = [c for c in old if counts.get(c)]
    if labelled:
        log.info(f"the new dataset labels old classes too ({', '.join(f'{c} {counts[c]}' for c in labelled)} boxes): "
                 "trained from those labels, with no pseudo-labels for them")
    return old, new, labelled


def run_add_classes(teacher_path: str | Path, cfg: Config, out_dir: str | Path, method: str = "sdidd+",
                    test: Optional[DataConfig] = None, old_test: Optional[DataConfig] = None,
                    replay: Optional[DataConfig] = None) -> AddClassesResult:
    """Train the student of `teacher_path` on `cfg.data` (new classes only) and report old / new / all AP50.

    `replay`: a description of kept old images; `cfg.incremental.replay_images` of them per old class join the step.
    """
    state = load_checkpoint(teacher_path)
    det = state["detector"]
    if cfg.model.backbone != det["backbone"]:
        raise SdiddError(f"{teacher_path}: the teacher is a {det['backbone']} model, the recipe asks for {cfg.model.backbone}; "
                         "drop model.backbone (add-classes keeps the teacher's architecture)")
    data = load_run_data(cfg.data)
    old, new, labelled = plan_classes(state, data, teacher_path)
    if cfg.incremental.replay_images and replay is None:
        raise SdiddError(f"incremental.replay_images={cfg.incremental.replay_images}: give the kept old images with "
                         "--replay OLD.yaml (add-classes replays no image of the new dataset)")
    if replay is not None and cfg.incremental.replay_images:
        kept = decode_once(load_split(replay, replay.train_split), replay)
        if not any(c in kept.classes for c in old):
            raise SdiddError(f"--replay {replay.train_ann or replay.train_path}: names none of the teacher's classes ({', '.join(old)})")
        # Its own image ids may be the new dataset's: moved past them, since the teachers' caches are keyed by id.
        taken = [r.image_id for d in (data.train, data.test, data.val) if d is not None for r in d.records]
        data.replay = offset_ids(kept, max(taken, default=0) + 1)
    teacher = model_from_checkpoint(state)
    spec = StepSpec(old + new, new, method, int(state.get("step", 0)) + 1, labelled_old=labelled)
    cfg = replaced(data.sized(cfg), {"incremental.method": method})
    result = train_step(cfg, spec, out_dir, data, teacher=teacher)

    # The test sets the user holds: every class at once, or old and new apart (with the teacher on the old set).
    device = select_device(cfg.train.device)
    sources: dict[str, tuple[str, Optional[EvalResult]]] = {}
    teacher_res: Optional[EvalResult] = None
    post = spec.postprocess(cfg.incremental.old_new_nms)  # as the step's own evaluation and `sdidd predict` do
    if test is not None:
        full = decode_once(load_split(test, test.test_split), test)
        res = evaluate_model(result.model, channel_view(full, spec.classes, keep_empty=True), cfg.data, device, postprocess=post)
        teacher_res = evaluate_model(teacher.to(device), channel_view(full, old, keep_empty=True), cfg.data, device)
        sources = {c: (f"{_source(test)} (all classes)", res) for c in spec.classes}
    else:
        if old_test is not None:
            old_set = decode_once(load_split(old_test, old_test.test_split), old_test)
            res = evaluate_model(result.model, channel_view(old_set, spec.classes, keep_empty=True), cfg.data, device,
                                 postprocess=post)
            teacher_res = evaluate_model(teacher.to(device), channel_view(old_set, old, keep_empty=True), cfg.data, device)
            sources.update({c: (f"{_source(old_test)} (old test set)", res) for c in old})
        else:
            log.warning("warning: no old test set given (--old-test or --test): how much of the old classes was kept is not measured")
        if len(data.test):  # with data.val_fraction the step was evaluated on the images it held out, and says so
            where = data.test.name if cfg.data.val_fraction else f"{_source(cfg.data)} (new dataset's test split)"
            # Old classes the new data labels are measured there too, unless an old test set was given.
            sources.update({c: (where, result.metrics) for c in new + [c for c in labelled if c not in sources]})
        else:
            log.warning("warning: the new dataset has no test split and no --test was given: the new classes are not evaluated")
    rows = []
    for c in spec.classes:
        where, res = sources.get(c, ("not evaluated", None))
        rows.append({"class": c, "group": "old" if c in old else "new", "teacher_ap50": _ap(teacher_res, c),
                     "ap50": _ap(res, c), "test_set": where})
    groups = {g: _mean([r["ap50"] for r in rows if g == "all" or r["group"] == g]) for g in ("old", "new", "all")}
    groups["teacher_old"] = _mean([r["teacher_ap50"] for r in rows if r["group"] == "old"])
    out = AddClassesResult(result, rows, groups)
    write_json(Path(out_dir) / "add_classes.json", {"teacher": str(teacher_path), "method": method, "classes_old": old,
                                                     "classes_new": new, "rows": rows, "groups": groups},
               indent=2, default=lambda v: None)
    log.info(format_add_classes(out))
    return out


def _source(d: DataConfig) -> str:
    """The file a test split comes from (COCO json, VOC list or folder, YOLO image folder), for the report."""
    return str(d.test_ann or d.test_path or d.val_ann or d.val_path or d.test_split)


def format_add_classes(r: AddClassesResult) -> str:
    """Per class: teacher AP50 (old classes), AP50 after adding, the test set it came from; then old / new / all."""
    def f(v: float) -> str:
        return f"{'n/a':>8}" if math.isnan(v) else f"{v:8.1f}"
    width = max(len(row["class"]) for row in r.rows) + 2
    lines = [f"{'class':<{width}}{'group':<7}{'teacher':>8}{'AP50':>8}  test set", "-" * (width + 40)]
    for row in r.rows:
        lines.append(f"{row['class']:<{width}}{row['group']:<7}{f(row['teacher_ap50'])}{f(row['ap50'])}  {row['test_set']}")
    g = r.groups
    lines.append("-" * (width + 40))
    lines.append(f"mAP50 old {g['old']:.1f} (teacher {g['teacher_old']:.1f}, kept {g['old'] - g['teacher_old']:+.1f}); "
                 f"new {g['new']:.1f}; all {g['all']:.1f}" if not math.isnan(g["teacher_old"]) else
                 f"mAP50 old {g['old']:.1f}; new {g['new']:.1f}; all {g['all']:.1f}")
    lines.append(f"model: {r.step.checkpoint} (the teacher of a next add-classes run)")
    return "\n".join(lines)
