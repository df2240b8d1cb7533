"""The training objective of a step: GFL on the labelled channels plus the method's distillation terms."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import DistillConfig, LossConfig
from ..distill import dscrd_loss, erd_box_loss, hccd_loss, idfd_loss, kd_mismatch_loss
from ..model.detector import DenseOutput
from ..model.gfl_loss import assign_targets, gfl_loss


def step_loss(
    student: DenseOutput,
    teacher: Optional[DenseOutput],
    gt_boxes: list[Tensor],
    gt_labels: list[Tensor],
    num_old: int,
    loss_cfg: LossConfig,
    qfl_weight: float,
    distill: Optional[DistillConfig],
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Total loss and a log dict of its parts (detached tensors: no sync per step) and selection sizes.

    `gt_labels` index the trained channels `num_old:` (old channels get no GT supervision, METHOD §2.4).
    """
    grid = student.grid
    targets = assign_targets(grid, gt_boxes, gt_labels)
    parts = gfl_loss(student.cls[..., num_old:], student.reg, grid, targets, qfl_weight, loss_cfg.giou, loss_cfg.dfl)
    losses: dict[str, Tensor] = {k: v for k, v in parts.items() if k != "num_pos"}
    counts: dict[str, float] = {"n_pos": float(parts["num_pos"])}

    if teacher is not None and distill is not None:
        s_cls, s_reg = student.cls.float(), student.reg.float()
        t_cls, t_reg = teacher.cls.float(), teacher.reg.float()
        new_slice = slice(num_old, s_cls.shape[-1])
        # Batch-summed terms are put on the release's per-batch-of-2 scale (see DistillConfig.release_batch).
        per_batch = distill.release_batch / s_cls.shape[0] if distill.release_batch else 1.0
        if distill.hccd:
            losses["hccd"], n = hccd_loss(s_cls, t_cls, weight=distill.hccd_weight * per_batch, min_score=distill.hccd_min_score)
            counts["n_hccd"] = float(n)
        if distill.erd_box:
            losses["erd_box"], n = erd_box_loss(
                s_cls, s_reg, t_cls, t_reg, grid.points, grid.strides, nms_iou=distill.erd_box_nms_iou,
                T=distill.temperature, weight=distill.erd_box_weight * per_batch, scale_by_stride=distill.erd_box_stride_fix,
            )
            counts["n_erd_box"] = float(n)
        if distill.dscrd:
            r = dscrd_loss(s_cls, s_reg, t_reg, grid.boxes, grid.num_per_level, gt_boxes, new_slice,
                           T=distill.temperature, ld_weight=distill.ld_weight * per_batch, vlr_weight=distill.vlr_weight * per_batch)
            losses["ld"], losses["vlr"] = r["ld"], r["vlr"]
            counts["n_ld"], counts["n_vlr"] = float(r["n_pos"]), float(r["n_vlr"])
        if distill.idfd:
            losses["idfd"], n = idfd_loss(
                student.feats, teacher.feats, grid.boxes, grid.num_per_level, gt_boxes, ratio=distill.idfd_ratio,
                weight=distill.idfd_weight, zero_levels_without_positives=distill.idfd_zero_levels_without_positives,
                pos_masks=targets.pos_mask, normalize=distill.idfd_normalize,
            )
            counts["n_idfd"] = float(n)
        if distill.kd_mismatch:
            losses["kd"] = kd_mismatch_loss(s_cls, t_cls, targets.pos_mask, new_slice, weight=distill.kd_weight)
    total = torch.stack([v.float() for v in losses.values()]).sum()
    log: dict[str, Tensor | float] = {"loss": total.detach()}
    log.update({f"loss_{k}": v.detach() for k, v in losses.items()})
    log.update(counts)
    return total, log
