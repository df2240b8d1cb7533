"""One step of the protocol (base, joint, or incremental with a teacher): the epoch loop, checkpoints, evaluation."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config
from ..errors import SdiddError
from ..evaluate import EvalResult, format_table, result_to_dict
from ..model.detector import GFL, DenseOutput
from ..model.stack import ModelStack
from ..run_files import FolderLock, append_result_row, claim_folder, write_json
from . import distributed as dist
from . import precision
from .build import Step, StepSpec, build_step
from .checkpoint import kept_models_record, rng_state, save_checkpoint, save_epoch
from .evaluation import evaluate_model
from .new_teacher import attach_new_teacher
from .objective import step_loss
from .run_data import RunData, load_run_data
from .step_log import StepLog
from .replay import batch_channels
from .teacher_cache import TeacherCache, cache_blocker

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What a finished step leaves: its model, checkpoint and last-epoch metrics."""

    model: nn.Module  # a GFL, or for method two-models the ModelStack of the kept and the new detector
    checkpoint: Path
    metrics: EvalResult
    stats: dict[str, float] = field(default_factory=dict)


def train_one_epoch(step: Step, epoch: int, step_log: StepLog) -> int:
    """Train `step` for one epoch; returns the number of images seen. One host sync per iteration: the NaN guard."""
    cfg, t, device = step.cfg, step.cfg.train, step.device
    step.loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    # Per-epoch seeds make augmentation independent of where a run was resumed (offset 0 unless DDP rank > 0).
    torch.manual_seed(t.seed * 7919 + step.spec.step * 131 + epoch + dist.rank_seed_offset())
    use_amp = step.mode.amp
    bar = tqdm(step.loader, desc=f"step {step.spec.step} epoch {epoch + 1}/{step.schedule.epochs}",
               disable=not (t.progress and dist.is_main()), dynamic_ncols=True, leave=False)
    start, seen = time.perf_counter(), 0
    for batch in bar:
        if step.schedule.total_iters and step.iteration >= step.schedule.total_iters:
            break  # a step stretched to train.min_iters stops part-way through its last epoch
        images, boxes, labels, sizes = batch_to_device(step, batch)
        keys = list(zip(batch["image_ids"], batch["flips"]))  # what the teacher caches are indexed by
        # The networks run in bf16 where the device has it; the objective reads their outputs in fp32.
        with precision.autocast(device, use_amp):
            out = step.ddp_model(images)
            t_out = frozen_outputs(step.teacher, step.teacher_cache, images, keys)
            nt_out = frozen_outputs(step.new_teacher, step.new_teacher_cache, images, keys)
        trained, at_positives, replayed = batch_channels(step.trained, step.replay_channels, step.replay_ids,
                                                         batch["image_ids"])
        pseudo = step.pseudo_channels if replayed is None or step.pseudo_channels is None else step.pseudo_channels & ~replayed
        loss, parts = step_loss(precision.float_output(out), t_out, boxes, labels, sizes, trained, cfg.loss,
                                step.qfl_weight, step.distill, nt_out, step.new_channels, pseudo, at_positives)
        # DDP: every rank must stop together, or the others wait in the gradient all-reduce until torchrun times out.
        finite = torch.isfinite(loss.detach())
        if dist.any_rank(~finite):
            _stop_non_finite(step, epoch, parts, bool(finite))
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:  # the pre-clip norm is logged: far above grad_clip means the step is mostly clipped away
            parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(step.model.parameters(), t.grad_clip).detach()
        step.optimizer.step()
        step.scheduler.step()
        step.iteration += 1
        seen += images.shape[0]
        if step.iteration % t.log_every == 0 or step.iteration == 1:
            values = dist.reduce_log(parts)  # the only other host transfer, every log_every iterations
            row = {"epoch": epoch + 1, "iter": step.iteration, "lr": step.optimizer.param_groups[0]["lr"]}
            row.update({k: round(float(v), 6) for k, v in values.items()})
            row["img_s"] = round(seen * dist.world_size() / max(time.perf_counter() - start, 1e-9), 2)
            step_log.write(row)
            bar.set_postfix({k.replace("loss_", ""): f"{row[k]:.3f}" for k in row if k.startswith("loss")} | {"img/s": row["img_s"]})
    return seen


@torch.no_grad()
def frozen_outputs(model: Optional[GFL], cache: Optional[TeacherCache], images: torch.Tensor,
                   keys: list[tuple[int, bool]]) -> Optional[DenseOutput]:
    """A frozen teacher's outputs for the batch in fp32 (read from `cache` where it holds them); None without a teacher."""
    if model is None:
        return None
    return precision.float_output(cache(images, keys) if cache is not None else model(images))


def batch_to_device(step: Step, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, boxes, labels, sizes) on the step's device; resized / flipped there with data.device_transforms."""
    device, on_device = step.device, getattr(step.loader.collate_fn, "to_device", None)
    if on_device is not None:
        images, boxes, labels, sizes = on_device(batch, device)
    else:
        images, boxes, labels, sizes = (batch[k].to(device, non_blocking=True) for k in ("images", "boxes", "labels", "sizes"))
    if step.mode.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, boxes, labels, sizes


def speed_setup(step: Step) -> None:
    """Speed settings of a built step: teacher caches, channels_last weights (step.mode), train.compile (student forward)."""
    t = step.cfg.train
    if t.teacher_cache_gb and (step.teacher is not None or step.new_teacher is not None):
        blocker = cache_blocker(step.loader.dataset, step.cfg.data.train_sizes)
        if blocker is None:
            budget = int(t.teacher_cache_gb * 2**30)
            # Two teachers share the budget; the old teacher is read by every distillation term, so it comes first.
            if step.teacher is not None:
                step.teacher_cache = TeacherCache(step.teacher, budget if step.new_teacher is None else budget // 2)
            if step.new_teacher is not None:
                step.new_teacher_cache = TeacherCache(step.new_teacher, budget // 2 if step.teacher is not None else budget,
                                                      name="new-class teacher")
        else:
            log.info(f"teacher outputs not cached: {blocker}")
    if step.mode.channels_last:  # in place: the optimizer keeps the same parameters
        for model in (step.model, step.teacher, step.new_teacher, step.kept):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    if t.compile:
        step.ddp_model = torch.compile(step.ddp_model)


def _stop_non_finite(step: Step, epoch: int, parts: dict[str, torch.Tensor], finite: bool) -> None:
    bad = [k for k, v in parts.items() if k.startswith("loss_") and not math.isfinite(float(v))]
    where = f"part: {', '.join(bad) or 'total'}" if not finite else "on another rank"
    last = step.out_dir / "last.pth"
    raise SdiddError(f"non-finite loss at epoch {epoch + 1}, iteration {step.iteration + 1} ({where}); "
                     f"the last good checkpoint is {last if last.exists() else 'not written yet'}; try a lower train.lr")


def eval_interval(eval_every: Optional[int], has_val: bool, epochs: int) -> int:
    """Epochs between evaluations during training: train.eval_every, or (unset) about ten per run with a val split."""
    if eval_every is not None:
        return eval_every
    return max(1, round(epochs / 10)) if has_val else 0


def validate(step: Step, epoch: int, result: Optional[EvalResult] = None) -> EvalResult:
    """Evaluate after `epoch` on the val split (else the test split), log it to results.csv, keep best.pth on val."""
    cfg = step.cfg
    target = step.val_set if step.val_set is not None else step.test_set
    if result is None:
        result = evaluate_model(step.inference_model(), target, cfg.data, step.device, workers=cfg.train.workers,
                                postprocess=step.spec.postprocess(cfg.incremental.old_new_nms))
    name = "val split" if step.val_set is not None else "test split (no val split: not for choosing a model)"
    log.info(f"epoch {epoch}: mAP50 {result.map50:.1f} on the {name}")
    if dist.is_main():
        append_result_row(step.out_dir / "results.csv", {"epoch": epoch, "iteration": step.iteration,
                                                        "split": name.split(" (")[0], "map50": round(result.map50, 3),
                                                        "map": round(result.map, 3)})
    if step.val_set is not None and result.map50 > step.stats.get("best_val_map50", -1.0):
        step.stats["best_val_map50"], step.stats["best_epoch"] = result.map50, float(epoch)
        if dist.is_main():
            save_checkpoint(step_state(step, epoch) | {"metrics_val": result_to_dict(result)}, step.out_dir / "best.pth")
            log.info(f"best.pth: epoch {epoch} (val mAP50 {result.map50:.1f})")
    return result


def step_state(step: Step, epoch: int) -> dict:
    """What a checkpoint of the step after `epoch` holds (weights, classes, config, optimiser, RNG, stats)."""
    spec = step.spec
    kept = kept_models_record(step.kept, step.cfg.incremental.new_score_damp, step.stack_blend) if step.kept is not None else {}
    return {
        "model": step.model.state_dict(), "detector": step.model.cfg.__dict__ | {"num_classes": len(spec.classes)},
        "classes": list(spec.classes), "new_classes": list(spec.new_classes), "step": spec.step, "method": spec.method,
        "config": step.cfg.to_dict(), "optimizer": step.optimizer.state_dict(), "scheduler": step.scheduler.state_dict(),
        "epoch": epoch, "iteration": step.iteration, "rng": rng_state(), "stats": dict(step.stats), **kept,
    }


def save_step(step: Step, epoch: int, metrics: Optional[dict] = None) -> Path:
    """Checkpoint the step after `epoch` (rank 0 writes; the others wait), refusing non-finite weights."""
    last = step.out_dir / "last.pth"
    # A gradient overflow in the epoch's last step leaves NaN weights behind a finite loss: never let them replace last.pth.
    names, params = zip(*step.model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for p in params])  # one host sync for all tensors, not one each
    bad = None if bool(finite.all()) else names[int((~finite).int().argmax())]
    if bad is not None:
        raise SdiddError(f"non-finite weights after epoch {epoch} (e.g. {bad}); not saved, the last good checkpoint is "
                         f"{last if last.exists() else 'not written yet'}; try a lower train.lr or set train.grad_clip")
    state = step_state(step, epoch)
    if metrics is not None:
        state["metrics"] = metrics
    if dist.is_main():
        save_epoch(state, step.out_dir, epoch, step.cfg.train.keep_checkpoints)
    dist.barrier()  # the other ranks must not run ahead (next step, resume check) of rank 0's write
    return last


def train_step(cfg: Config, spec: StepSpec, out_dir: str | Path, data: Optional[RunData] = None,
               teacher: Optional[GFL | ModelStack] = None, new_teacher_dir: Optional[Path] = None) -> StepResult:
    """Train one step and evaluate its last epoch on the test split (every class the step knows).

    With `distill.new_teacher=finetune` the new-class teacher is fine-tuned first into `new_teacher_dir`
    (default: `<out_dir>/new_teacher`). The output folder is locked for the step's life (one run per folder),
    and a folder holding a run already is continued (train.resume), cleared (train.overwrite) or refused.
    """
    lock = FolderLock(out_dir).acquire() if dist.is_main() else None
    try:
        if dist.is_main():
            claim_folder(out_dir, cfg.train.resume, cfg.train.overwrite)
        return _train_step(cfg, spec, Path(out_dir), data, teacher, new_teacher_dir)
    finally:
        if lock is not None:
            lock.release()


def _train_step(cfg: Config, spec: StepSpec, out_dir: Path, data: Optional[RunData], teacher: Optional[GFL | ModelStack],
                new_teacher_dir: Optional[Path]) -> StepResult:
    data = data or load_run_data(cfg.data)
    cfg = data.sized(cfg)  # the image sizes chosen from the data (when the recipe leaves them unset) go with the step
    step = build_step(cfg, spec, data, Path(out_dir), teacher)
    if step.stored_metrics is not None:  # a finished step is not retrained
        return StepResult(step.inference_model(), step.out_dir / "last.pth", EvalResult(**step.stored_metrics), dict(step.stats))
    attach_new_teacher(step, teacher, Path(new_teacher_dir or Path(out_dir) / "new_teacher"),
                       train=lambda c, s, d: train_step(c, s, d, data, teacher=teacher))
    if dist.is_main():
        step.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(step.out_dir / "config.json", cfg.to_dict(), indent=2)
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    speed_setup(step)
    log.info(f"step {spec.step} ({spec.method}): {step.mode}")
    step_log = StepLog(step.out_dir, step.iteration)
    step.model.train()
    for epoch in range(step.start_epoch, step.schedule.epochs):
        start = time.perf_counter()
        seen = train_one_epoch(step, epoch, step_log)
        step.stats["train_seconds"] += time.perf_counter() - start
        step.stats["train_images"] += seen * dist.world_size()
        every = eval_interval(cfg.train.eval_every, step.val_set is not None, step.schedule.epochs)
        if every and (epoch + 1) % every == 0 and epoch + 1 < step.schedule.epochs:
            validate(step, epoch + 1)
        if (epoch + 1) % cfg.train.save_every == 0 or epoch + 1 == step.schedule.epochs:  # resume reads the latest
            save_step(step, epoch + 1)
    step_log.close()
    for cache in (step.teacher_cache, step.new_teacher_cache):
        if cache is not None:
            log.info(cache.summary())

    stats = step.stats
    stats["images_per_second"] = stats["train_images"] / max(stats["train_seconds"], 1e-9)
    stats["peak_memory_mb"] = (torch.cuda.max_memory_allocated(step.device) / 2**20) if step.device.type == "cuda" else _rss_mb()
    result = evaluate_model(step.inference_model(), step.test_set, cfg.data, step.device, groups=spec.groups,
                            workers=cfg.train.workers, postprocess=spec.postprocess(cfg.incremental.old_new_nms))
    if step.val_set is not None:  # the last epoch competes for best.pth too (on the val split, not the test split)
        validate(step, step.schedule.epochs, result if step.val_set is step.test_set else None)
    last = save_step(step, step.schedule.epochs, result_to_dict(result))
    if dist.is_main():
        write_json(step.out_dir / "metrics.json", result_to_dict(result) | {"stats": stats}, indent=2)
    dist.barrier()
    return StepResult(step.inference_model(), last, result, stats)


def _rss_mb() -> float:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


def log_result(result: EvalResult, title: str = "") -> None:
    """Log a per-class table (the CLI prints it on rank 0)."""
    log.info((title + "\n" if title else "") + format_table(result))
