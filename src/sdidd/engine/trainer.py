"""One training step of the protocol (base, joint, or incremental with a teacher): loop, logs, checkpoints."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config, qfl_weight, resolved_distill
from ..data import DetectionDataset
from ..errors import SdiddError
from ..evaluate import EvalResult, evaluate_detections, format_table, result_to_dict
from ..model.detector import GFL, DetectorConfig, build_detector
from . import distributed as dist
from .checkpoint import check_fits, load_checkpoint, save_checkpoint, settings_changed
from .data_setup import load_split, relabel, test_loader, train_loader
from .incremental import extend_student, freeze_teacher
from .objective import step_loss


@dataclass
class StepSpec:
    """What one step trains: the classes of its head (channel order) and the ones labelled in its data."""

    classes: list[str]  # every class the model knows after this step, in channel order
    new_classes: list[str]  # the trailing classes labelled in this step's training images
    method: str = "joint"  # base/joint (plain GFL), finetune, erd, sdidd
    step: int = 0

    @property
    def num_old(self) -> int:
        return len(self.classes) - len(self.new_classes)


@dataclass
class StepResult:
    """What a finished step leaves: its model, checkpoint and last-epoch metrics."""

    model: GFL
    checkpoint: Path
    metrics: EvalResult
    stats: dict[str, float] = field(default_factory=dict)


def select_device(name: str) -> torch.device:
    """'auto' picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SdiddError(f"config key 'train.device': {name} requested but CUDA is not available")
    return torch.device(name)


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


def model_from_checkpoint(state: dict[str, Any], device: torch.device | str = "cpu") -> GFL:
    """Rebuild a detector from a checkpoint's architecture record and weights."""
    try:
        det = DetectorConfig(**{**state["detector"], "pretrained": False})
    except TypeError as e:  # a detector record of another sdidd version (unknown or missing fields)
        raise SdiddError(f"checkpoint detector record does not fit this sdidd ({e})") from None
    model = build_detector(det)
    _load_weights(model, state["model"], f"the {det.backbone} detector it describes ({det.num_classes} classes)")
    return model.to(device)


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load `weights` strictly; any missing, unexpected or mis-shaped tensor is one SdiddError line."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    # load_state_dict raises a multi-line RuntimeError on shape mismatches: name the first one instead.
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        first = (f", e.g. {shapes[0]} is {tuple(weights[shapes[0]].shape)} in the checkpoint, {tuple(own[shapes[0]].shape)} in the model"
                 if shapes else f", e.g. {(missing or unexpected)[0]}")
        raise SdiddError(f"checkpoint weights do not fit {what} (missing {len(missing)}, unexpected {len(unexpected)}, "
                         f"mis-shaped {len(shapes)} tensors{first})")
    model.load_state_dict(weights)


def lr_factor(it: int, iters_per_epoch: int, warmup_iters: int, warmup_ratio: float, milestones: list[int], gamma: float) -> float:
    """Linear warmup over iterations, then x gamma at each milestone epoch."""
    epoch = it // max(iters_per_epoch, 1)
    f = gamma ** sum(epoch >= m for m in milestones)
    if it < warmup_iters:
        f *= warmup_ratio + (1 - warmup_ratio) * it / warmup_iters
    return f


@torch.no_grad()
def evaluate_model(model: GFL, dataset: DetectionDataset, cfg: Config, device: torch.device,
                   groups: Optional[dict[str, list[int]]] = None, batch_size: int = 8) -> EvalResult:
    """Detect on every image of `dataset` and score with pycocotools (labels = model channels)."""
    was_training = model.training
    model.eval()
    loader = test_loader(dataset, cfg.data, batch_size, cfg.train.workers, sampler=dist.eval_sampler(dataset))
    detections: dict[int, dict[str, np.ndarray]] = {}
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda"):
            results = model.predict(images, batch["image_sizes"], batch["scales"])
        for image_id, r in zip(batch["image_ids"], results):
            detections[int(image_id)] = {k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in r.items()}
    detections = dist.gather_dict(detections)
    model.train(was_training)
    return evaluate_detections(dataset.records, dataset.classes, detections, groups=groups)


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers, so weights-only loading can read it back."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `_rng_state` saved (parts a checkpoint lacks are left as they are)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _check_teacher(teacher_state: dict[str, Any], spec: StepSpec, cfg: Config, path: str) -> None:
    """Refuse a teacher whose classes or backbone do not fit the step."""
    check_fits(teacher_state, path, f"be the teacher of step {spec.step} ({spec.method})", spec.classes[: spec.num_old], cfg.model.backbone)


def train_step(cfg: Config, spec: StepSpec, out_dir: str | Path, teacher: Optional[GFL] = None,
               epochs: Optional[int] = None, lr: Optional[float] = None) -> StepResult:
    """Train one step and evaluate its last epoch on the test split (classes seen so far)."""
    out_dir = Path(out_dir)
    t = cfg.train
    epochs = epochs or t.epochs
    lr = lr or t.lr
    device = select_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed + 1000 * spec.step, t.deterministic)
    method = spec.method if spec.method in ("finetune", "erd", "sdidd") else "joint"
    distill = resolved_distill(cfg, method) if teacher is not None else None
    if teacher is None and spec.num_old > 0:
        raise SdiddError(f"step {spec.step} ({spec.method}) has old classes {spec.classes[:spec.num_old]} but no teacher")

    # ---- data: new-class labels only in training; every seen class in test
    full_train = load_split(cfg.data, cfg.data.train_split)
    full_test = load_split(cfg.data, cfg.data.test_split)
    from .data_check import guard_dataset  # local import: keeps the trainer importable without the checker
    full_train = guard_dataset(full_train, cfg.data)
    # The test images too: an unreadable one would otherwise stop the run at the final evaluation, after training.
    full_test = guard_dataset(full_test, cfg.data)
    train_set = relabel(full_train, spec.new_classes)
    test_set = relabel(full_test, spec.classes, keep_empty=True)
    if len(train_set) == 0:
        raise SdiddError(f"no training image holds a box of {spec.new_classes}")
    loader = train_loader(train_set, cfg.data, t.batch_size, t.workers, t.seed + spec.step, sampler=dist.train_sampler(train_set, t.seed + spec.step))
    iters_per_epoch = len(loader)

    # ---- model
    if teacher is not None:
        teacher = freeze_teacher(teacher.to(device))
        model = extend_student(teacher, len(spec.classes), cfg.incremental.new_class_init).to(device)
    else:
        model = build_detector(detector_config(cfg, len(spec.classes))).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    # Incremental steps (those with a teacher) may have their own decay epochs.
    milestones = cfg.incremental.milestones if teacher is not None and cfg.incremental.milestones is not None else cfg.train.milestones
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, t.warmup_iters, t.warmup_ratio, milestones, t.gamma))
    use_amp = t.amp and device.type == "cuda"

    # ---- resume
    start_epoch, iteration = 0, 0
    last = out_dir / "last.pth"
    if t.resume and last.is_file():
        state = load_checkpoint(last, map_location=device)
        check_fits(state, last, "resume", spec.classes, cfg.model.backbone, spec.step,
                   hint="use another train.out_dir or train.resume=false")
        _load_weights(model, state["model"], f"the model of this config ({cfg.model.backbone}); use another train.out_dir or train.resume=false")
        # Resuming under other settings would silently mix two experiments (or reuse a finished one as this one's result).
        changed = settings_changed(state.get("config", {}), cfg.to_dict(), teacher is not None)
        if int(state.get("epoch", 0)) > epochs:
            changed.insert(0, f"{state['epoch']} epochs trained (now {epochs})")
        if changed:
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise SdiddError(f"{last}: cannot resume, it was trained with other settings: {'; '.join(changed[:4])}{more}; "
                             f"use another train.out_dir (benchmark: --out), restore the settings, or delete the folder to start over")
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, iteration = int(state["epoch"]), int(state["iteration"])
            # Epochs reseed data order and augmentation themselves; this restores anything else drawn between epochs.
            _set_rng_state(state.get("rng", {}))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise SdiddError(f"{last}: cannot resume, its optimizer/scheduler/RNG state does not fit this run ({type(e).__name__}: {e})") from None
        if dist.is_main():
            print(f"resumed {last} at epoch {start_epoch}/{epochs}")
        if start_epoch >= epochs and "metrics" in state:
            return StepResult(model, last, _result_from_dict(state["metrics"], test_set), dict(state.get("stats", {})))

    # Wrapped after resume, so DDP's start-up broadcast already carries the resumed weights (rank 0's).
    ddp_model = dist.wrap(model, device)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_dist():
            print(f"DDP: {dist.world_size()} ranks x train.batch_size {t.batch_size} = global batch {t.batch_size * dist.world_size()}, "
                  f"{iters_per_epoch} iterations/epoch, lr {lr} (not scaled)")
    log_path = out_dir / "log.csv"
    if iteration > 0 and dist.is_main():  # resumed: drop the rows of the epoch the interruption cut short, it is trained again
        _trim_log(log_path, iteration)
    start_iteration = iteration
    log_file = None
    writer = None
    if dist.is_main():
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    qfl_w = qfl_weight(cfg, method)
    stats = {"train_seconds": 0.0, "train_images": 0.0}
    if t.resume and last.is_file():
        stats.update({k: float(v) for k, v in state.get("stats", {}).items()})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save(epoch: int, metrics: Optional[dict] = None) -> Path:
        # A gradient overflow in the epoch's last step leaves NaN weights behind a finite loss: never let them replace last.pth.
        bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise SdiddError(f"non-finite weights after epoch {epoch} (e.g. {bad}); not saved, the last good checkpoint is "
                             f"{last if last.exists() else 'not written yet'}; try a lower train.lr or set train.grad_clip")
        ckpt = {
            "model": model.state_dict(), "detector": model.cfg.__dict__ | {"num_classes": len(spec.classes)},
            "classes": list(spec.classes), "new_classes": list(spec.new_classes), "step": spec.step, "method": spec.method,
            "config": cfg.to_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "iteration": iteration, "rng": _rng_state(), "stats": dict(stats),
        }
        if metrics is not None:
            ckpt["metrics"] = metrics
        if dist.is_main():
            save_checkpoint(ckpt, out_dir / f"epoch_{epoch}.pth")
            save_checkpoint(ckpt, last)
        dist.barrier()  # the other ranks must not run ahead (next step, resume check) of rank 0's write
        return last

    model.train()
    for epoch in range(start_epoch, epochs):
        # Per-epoch seeds make data order and augmentation independent of where a run was resumed.
        torch.manual_seed(t.seed * 7919 + spec.step * 131 + epoch + dist.rank_seed_offset())  # offset 0 unless DDP rank > 0
        random.seed(t.seed * 7919 + spec.step * 131 + epoch + dist.rank_seed_offset())
        loader.sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"[{spec.method}] step {spec.step} epoch {epoch + 1}/{epochs}", disable=None if (t.progress and dist.is_main()) else True,  # None: off when not a terminal
                   dynamic_ncols=True, leave=False)
        epoch_start, seen = time.perf_counter(), 0
        for batch in bar:
            images = batch["images"].to(device, non_blocking=True)
            gt_boxes = [tg["boxes"].to(device) for tg in batch["targets"]]
            gt_labels = [tg["labels"].to(device) for tg in batch["targets"]]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = ddp_model(images)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(images)
                loss, parts = step_loss(out, t_out, gt_boxes, gt_labels, spec.num_old, cfg.loss, qfl_w, distill)
            # DDP: every rank must stop together, or the others wait in the gradient all-reduce until torchrun times out.
            finite = torch.isfinite(loss.detach())
            if dist.any_rank(~finite):
                bad = [k for k, v in parts.items() if k.startswith("loss_") and not math.isfinite(float(v))]
                where = f"part: {', '.join(bad) or 'total'}" if not finite else "on another rank"
                save_path = out_dir / "last.pth"
                raise SdiddError(f"non-finite loss at epoch {epoch + 1}, iteration {iteration + 1} ({where}); "
                                 f"the last good checkpoint is {save_path if save_path.exists() else 'not written yet'}; try a lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                # The pre-clip norm is logged: a norm far above grad_clip means the step is mostly clipped away.
                parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, t.grad_clip).detach()
            optimizer.step()
            scheduler.step()
            iteration += 1
            seen += images.shape[0]
            if iteration % t.log_every == 0 or iteration == 1:
                parts = dist.reduce_log(parts)  # DDP: mean over ranks (every rank reaches this line at the same iterations)
                row = {"epoch": epoch + 1, "iter": iteration, "lr": optimizer.param_groups[0]["lr"]}
                row.update({k: round(float(v), 6) for k, v in parts.items()})
                row["img_s"] = round(seen * dist.world_size() / max(time.perf_counter() - epoch_start, 1e-9), 2)
                if dist.is_main():
                    if writer is None:
                        new_file = start_iteration == 0 or not log_path.exists()
                        log_file = open(log_path, "w" if new_file else "a", newline="")
                        writer = csv.DictWriter(log_file, fieldnames=list(row), extrasaction="ignore")
                        if new_file:
                            writer.writeheader()
                    writer.writerow(row)
                    log_file.flush()
                bar.set_postfix({k.replace("loss_", ""): f"{float(v):.3f}" for k, v in parts.items() if k.startswith("loss")} | {"img/s": row["img_s"]})
        stats["train_seconds"] += time.perf_counter() - epoch_start
        stats["train_images"] += seen * dist.world_size()
        metrics = None
        if t.eval_every and (epoch + 1) % t.eval_every == 0 and epoch + 1 < epochs:
            res = evaluate_model(model, test_set, cfg, device)
            if dist.is_main():
                print(f"epoch {epoch + 1}: mAP50 {res.map50:.1f}")
        save(epoch + 1, metrics)
    if log_file is not None:
        log_file.close()

    stats["images_per_second"] = stats["train_images"] / max(stats["train_seconds"], 1e-9)
    stats["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else _rss_mb()
    result = evaluate_model(model, test_set, cfg, device, groups=_groups(spec))
    save(epochs, result_to_dict(result))
    if dist.is_main():
        (out_dir / "metrics.json").write_text(json.dumps(result_to_dict(result) | {"stats": stats}, indent=2))
    dist.barrier()
    return StepResult(model, last, result, stats)


def _trim_log(log_path: Path, iteration: int) -> None:
    """Keep the header and the rows up to `iteration` of a log.csv, so a resumed run appends without duplicates."""
    if not log_path.is_file():
        return
    with open(log_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "iter" not in rows[0]:
        return
    col = rows[0].index("iter")
    kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and r[col].isdigit() and int(r[col]) <= iteration]
    tmp = log_path.with_name(log_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, log_path)


def _groups(spec: StepSpec) -> dict[str, list[int]]:
    n_old = spec.num_old
    groups = {"all": list(range(len(spec.classes)))}
    if n_old:
        groups["old"] = list(range(n_old))
        groups["new"] = list(range(n_old, len(spec.classes)))
    return groups


def _result_from_dict(d: dict, dataset: DetectionDataset) -> EvalResult:
    return EvalResult(per_class=d["per_class"], groups=d["groups"], map50=d["map50"], map=d["map"])


def _rss_mb() -> float:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


def print_result(result: EvalResult, title: str = "") -> None:
    """Print a per-class table (rank 0 only)."""
    if dist.is_main():
        if title:
            print(title)
        print(format_table(result))
