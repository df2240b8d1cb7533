"""Everything a step needs before its first iteration: data views, models, optimiser, schedule, resumed state."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config, DistillConfig
from ..methods import ENGINE_METHODS, qfl_weight, resolved_distill, uses_teacher
from ..data import DetectionDataset
from ..device import select_device
from ..errors import SdiddError, shown
from ..model.detector import GFL, DetectorConfig, build_detector
from ..model.stack import ModelStack, newest, stacked
from . import distributed as dist
from .checkpoint import check_fits, load_checkpoint, load_weights, set_rng_state, settings_changed
from .incremental import extend_student, freeze_teacher
from .precision import TrainMode, train_mode
from .pseudo_labels import pseudo_labelled
from .replay import with_replay
from .run_data import RunData, channel_view, cut_new_images, train_loader
from .schedule import Schedule, iterations, log_schedule, step_schedule
from .teacher_cache import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class StepSpec:
    """What one step trains: the classes of its head (channel order) and the ones labelled in its data."""

    classes: list[str]  # every class the model knows after this step, in channel order
    new_classes: list[str]  # the classes whose boxes this step's training images carry (trained channels)
    method: str = "joint"  # base/joint (plain GFL), finetune, erd, sdidd
    step: int = 0
    added: Optional[list[str]] = None  # the classes this step adds (default: new_classes; a joint step also relearns the old)
    # Old classes whose boxes the step's images keep (a line that labels every defect it sees): trained from those
    # labels as well as distilled, and given no pseudo-labels. Empty: the paper's protocol (new labels only).
    labelled_old: list[str] = field(default_factory=list)

    @property
    def added_classes(self) -> list[str]:
        """The classes first learned in this step (what the small-data protocol cuts the images of)."""
        return list(self.added if self.added is not None else self.new_classes)

    @property
    def num_old(self) -> int:
        """Channels kept from the teacher (0 for a base or joint step)."""
        return len(self.classes) - len(self.new_classes)

    def postprocess(self, old_new_nms: bool) -> dict[str, Any]:
        """`GFL.postprocess` settings of this step's model: with `old_new_nms` and old classes, NMS across the old
        classes and those the step added (`class_groups`: 0 old, 1 added; `incremental.old_new_nms`)."""
        if not (old_new_nms and self.num_old):
            return {}
        added = set(self.added_classes)
        return {"class_groups": [int(c in added) for c in self.classes]}

    @property
    def groups(self) -> dict[str, list[int]]:
        """Channel groups reported by the evaluation: all, and old/new for a step with old classes."""
        groups = {"all": list(range(len(self.classes)))}
        if self.num_old:
            groups["old"] = list(range(self.num_old))
            groups["new"] = list(range(self.num_old, len(self.classes)))
        return groups


@dataclass
class Step:
    """The state of one step's training, built once by :func:`build_step` and advanced by `train_one_epoch`."""

    cfg: Config
    spec: StepSpec
    out_dir: Path
    device: torch.device
    model: GFL  # the student, unwrapped (evaluation, checkpoints)
    ddp_model: nn.Module  # what the loop calls (DDP-wrapped under torchrun)
    teacher: Optional[GFL]  # None when no distillation term reads it (finetune skips the teacher's forward)
    distill: Optional[DistillConfig]
    qfl_weight: float
    trained: torch.Tensor  # [C] bool: the channels that get ground-truth supervision
    loader: DataLoader
    test_set: DetectionDataset
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Schedule
    start_epoch: int = 0
    iteration: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    stored_metrics: Optional[dict[str, Any]] = None  # set when resuming a finished step
    new_teacher: Optional[GFL] = None  # distill.new_teacher: distils the new classes (engine/new_teacher.py)
    new_channels: Optional[torch.Tensor] = None  # [N] the new teacher's channels of spec.new_classes
    teacher_cache: Optional[TeacherCache] = None  # the teachers' outputs per (image, flip), set by trainer.speed_setup
    val_set: Optional[DetectionDataset] = None  # a described dataset's val split: per-epoch evaluation, best.pth
    new_teacher_cache: Optional[TeacherCache] = None
    pseudo_channels: Optional[torch.Tensor] = None  # [C] bool: old channels trained on pseudo-labels (sdidd+)
    replay_ids: frozenset[int] = frozenset()  # image ids of the replayed old images (engine/replay.py)
    replay_channels: Optional[torch.Tensor] = None  # [C] bool: the channels a replayed image supervises (the old ones)
    mode: TrainMode = TrainMode(amp=False, channels_last=False)  # precision and memory format (train.amp, channels_last)
    kept: Optional[nn.Module] = None  # method two-models: the frozen earlier model(s) answering for the old classes

    def inference_model(self) -> nn.Module:
        """What the step's evaluation, checkpoint and next step use: the student, or with `kept` the stack of both."""
        if self.kept is None:
            return self.model
        return stacked(self.kept, self.model, self.cfg.incremental.new_score_damp, self.stack_blend)

    @property
    def stack_blend(self) -> float:
        """`incremental.old_score_blend` for a step that replayed old images; 0 otherwise: a fine-tune on new-class
        labels only learnt nothing about the old classes, so its old scores must not vote (model/stack.py)."""
        return self.cfg.incremental.old_score_blend if self.replay_ids else 0.0


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def detector_config(cfg: Config, num_classes: int) -> DetectorConfig:
    """Architecture from the run config."""
    m = cfg.model
    return DetectorConfig(num_classes=num_classes, backbone=m.backbone, pretrained=m.pretrained, fpn_channels=m.fpn_channels,
                          head_channels=m.head_channels, head_convs=m.head_convs, frozen_stages=m.frozen_stages, norm_eval=m.norm_eval)


def build_step(cfg: Config, spec: StepSpec, data: RunData, out_dir: Path,
               teacher: Optional[GFL | ModelStack]) -> Step:
    """Data views in the step's channel order, student (fresh or extended from `teacher`), optimiser, and resume."""
    t = cfg.train
    device = select_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed + 1000 * spec.step, t.deterministic)
    if teacher is None and spec.num_old > 0:
        raise SdiddError(f"step {spec.step} ({spec.method}) has old classes {spec.classes[:spec.num_old]} but no teacher")
    if spec.method not in (*ENGINE_METHODS, "base"):  # an unknown name must not silently train as joint
        raise SdiddError(f"step {spec.step}: unknown method {shown(spec.method)} (known: base, {', '.join(ENGINE_METHODS)})")
    method = "joint" if spec.method == "base" else spec.method

    source = data.train
    if spec.step > 0 and cfg.incremental.new_images:  # the small-data protocol: few images of the added classes
        # Joint (no teacher) keeps the old classes' boxes of the images it does not choose: only the new classes are cut.
        source = cut_new_images(source, spec.added_classes, cfg.incremental.new_images, t.seed + spec.step,
                                keep_other_boxes=teacher is None)
    # Labels become model channels here, once: training keeps only the boxes of the trained classes.
    train_set = channel_view(source, spec.classes, keep=spec.new_classes + spec.labelled_old)
    test_set = channel_view(data.test, spec.classes, keep_empty=True)
    if len(train_set) == 0:
        raise SdiddError(f"no training image holds a box of {spec.new_classes}")

    kept: Optional[nn.Module] = None
    if teacher is not None and method == "two-models":  # the old model answers for the old classes, frozen (model/stack.py)
        kept = freeze_teacher(teacher.to(device))
        teacher = newest(teacher)  # the student starts from the newest detector
    elif isinstance(teacher, ModelStack):
        raise SdiddError(f"step {spec.step} ({spec.method}): the teacher is a two-models checkpoint ({len(teacher.members)} "
                         "detectors); distillation needs one network, so a step on top of it runs with method two-models")
    distill = resolved_distill(cfg, method) if teacher is not None else None
    trained = torch.zeros(len(spec.classes), dtype=torch.bool, device=device)
    trained[spec.num_old:] = True
    labelled = [spec.classes.index(c) for c in spec.labelled_old]
    trained[labelled] = True
    stats: dict[str, float] = {}
    pseudo_channels: Optional[torch.Tensor] = None
    if teacher is not None:
        teacher = freeze_teacher(teacher.to(device))
        model = extend_student(teacher, len(spec.classes), cfg.incremental.new_class_init).to(device)
        if distill is not None and distill.pseudo_labels:  # old channels then train on the teacher's confident detections
            train_set, pl = pseudo_labelled(train_set, teacher, cfg.data, device, distill.pseudo_sigmas,
                                            distill.pseudo_overlap_iou, t.workers, labelled=labelled)
            pseudo_channels = ~trained  # the old channels no label of the step covers
            trained[:] = True
            stats = {"pseudo_boxes": float(pl["pseudo_boxes"]), "pseudo_images": float(pl["pseudo_images"])}
    else:
        model = build_detector(detector_config(cfg, len(spec.classes))).to(device)
    replay_ids: frozenset[int] = frozenset()
    replay_channels: Optional[torch.Tensor] = None
    if teacher is not None and cfg.incremental.replay_images:  # a few kept old images with their labels (replay.py)
        old_source = data.replay if data.replay is not None else data.train
        old_view = channel_view(old_source, spec.classes, keep=[c for c in spec.classes[:spec.num_old] if c in old_source.classes])
        train_set, replay_ids = with_replay(train_set, old_view, spec.num_old, cfg.incremental.replay_images,
                                            t.seed + spec.step, cfg.incremental.replay_repeat)
        replay_channels = torch.zeros_like(trained)
        replay_channels[:spec.num_old] = True
    loader = train_loader(train_set, cfg.data, t.batch_size, t.workers, t.seed + spec.step)
    iters_per_epoch = len(loader)
    schedule = step_schedule(cfg, teacher is not None, iters_per_epoch)
    log_schedule(schedule, iters_per_epoch, len(train_set), t.min_iters, f"step {spec.step} ({spec.method})")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=schedule.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: schedule.factor(it, iters_per_epoch))

    step = Step(cfg, spec, Path(out_dir), device, model, model, teacher if distill is not None and uses_teacher(distill) else None,
                distill, qfl_weight(cfg, method), trained, loader, test_set, optimizer, scheduler, schedule,
                stats={"train_seconds": 0.0, "train_images": 0.0, "epochs": round(iterations(schedule, iters_per_epoch) / max(iters_per_epoch, 1), 2),
                       "iterations": float(iterations(schedule, iters_per_epoch)),
                       # distinct images: an oversampled replay image (replay_repeat) is one image, seen k times an epoch
                       "images": float(len({r.image_id for r in train_set.records})), **stats})
    step.pseudo_channels, step.replay_ids, step.replay_channels = pseudo_channels, replay_ids, replay_channels
    step.kept = kept
    step.mode = train_mode(t.amp, t.channels_last, device)
    if data.val is not None:  # the same view when the val split is also what the final numbers are measured on
        step.val_set = test_set if data.val is data.test else channel_view(data.val, spec.classes, keep_empty=True)
    if t.resume and (step.out_dir / "last.pth").is_file():
        _resume(step, teacher is not None, distilled=distill is not None and method not in ("finetune", "two-models"))
    # Wrapped after resume, so DDP's start-up broadcast already carries the resumed weights (rank 0's).
    step.ddp_model = dist.wrap(model, device)
    if dist.is_dist():
        log.info(f"DDP: {dist.world_size()} ranks x train.batch_size {t.batch_size} = global batch {t.batch_size * dist.world_size()}, "
                 f"{iters_per_epoch} iterations/epoch, lr {schedule.lr} (not scaled)")
    return step


def _resume(step: Step, with_teacher: bool, distilled: bool) -> None:
    """Load last.pth into `step` after checking it belongs to the same experiment."""
    last = step.out_dir / "last.pth"
    cfg, spec = step.cfg, step.spec
    state = load_checkpoint(last, map_location=step.device)
    check_fits(state, last, "resume", spec.classes, cfg.model.backbone, spec.step, hint="use another train.out_dir or train.resume=false")
    load_weights(step.model, state["model"], f"the model of this config ({cfg.model.backbone}); use another train.out_dir or train.resume=false")
    # Resuming under other settings would silently mix two experiments (or reuse a finished one as this one's result).
    changed = settings_changed(state.get("config", {}), cfg.to_dict(), with_teacher, distilled)
    if int(state.get("epoch", 0)) > step.schedule.epochs:
        changed.insert(0, f"{state['epoch']} epochs trained (now {step.schedule.epochs})")
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise SdiddError(f"{last}: cannot resume, it was trained with other settings: {'; '.join(changed[:4])}{more}; "
                         f"use another train.out_dir (benchmark: --out), restore the settings, or delete the folder to start over")
    try:
        step.optimizer.load_state_dict(state["optimizer"])
        step.scheduler.load_state_dict(state["scheduler"])
        step.start_epoch, step.iteration = int(state["epoch"]), int(state["iteration"])
        # Epochs reseed data order and augmentation themselves; this restores anything else drawn between epochs.
        set_rng_state(state.get("rng", {}))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise SdiddError(f"{last}: cannot resume, its optimizer/scheduler/RNG state does not fit this run ({type(e).__name__}: {e})") from None
    step.stats.update({k: float(v) for k, v in state.get("stats", {}).items()})
    log.info(f"resumed {last} at epoch {step.start_epoch}/{step.schedule.epochs}")
    # A finished step is not re-evaluated, unless another method trained it (two-models reuses a finetune's training).
    if step.start_epoch >= step.schedule.epochs and "metrics" in state and state.get("method") == spec.method:
        step.stored_metrics = state["metrics"]
