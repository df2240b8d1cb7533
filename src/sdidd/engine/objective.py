"""The training objective of a step: GFL on the trained channels plus the method's distillation terms.

One label space: labels are model-channel indices (old classes first); ``trained`` [C] says which
channels get GT (QFL) supervision. ATSS runs once per step (:func:`assign_targets`) and its
Assignment feeds GFL, DSCRD and IDFD. The loss path has no host syncs except ERD-box's NMS (one
``nonzero`` + one ``batched_nms`` over the batch, see ``distill/erd_box.py``); every count and log
entry is a detached 0-dim tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import DistillConfig, LossConfig
from ..distill import dscrd_loss, erd_box_loss, hccd_loss, idfd_loss, kd_mismatch_loss, new_class_positives, new_teacher_loss
from ..model.detector import DenseOutput
from ..model.gfl_loss import assign_targets, gfl_loss


def step_loss(student: DenseOutput, teacher: Optional[DenseOutput], gt_boxes: Tensor, gt_labels: Tensor,
              image_sizes: Tensor, trained: Tensor, loss_cfg: LossConfig, qfl_weight: float,
              distill: Optional[DistillConfig], new_teacher: Optional[DenseOutput] = None,
              new_channels: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and a log dict of detached 0-dim tensors: 'loss', 'loss_<part>' per term and the 'n_*' counts.

    gt_boxes [B, G, 4] xyxy input pixels and gt_labels [B, G] (model channels, -1 = padding) are the
    step's GTs (the new classes in an incremental step); image_sizes [B, 2] (h, w) locate each image in
    the padded canvas. Distillation runs when both `teacher` and `distill` are given; the old classes
    are the teacher's channels, the new ones the student's channels from there on. `new_teacher` (with
    `new_channels` [N], its channels of the step's new classes) distils the new classes' scores and boxes.
    """
    grid = student.grid
    asg = assign_targets(grid, gt_boxes, gt_labels)
    parts = gfl_loss(student.cls, student.reg, grid, asg, trained, qfl_weight, loss_cfg.giou, loss_cfg.dfl)
    losses: dict[str, Tensor] = {k: v for k, v in parts.items() if k != "num_pos"}
    counts: dict[str, Tensor] = {"n_pos": parts["num_pos"]}

    if teacher is not None and distill is not None:
        s_cls, s_reg = student.cls.float(), student.reg.float()
        t_cls, t_reg = teacher.cls.float(), teacher.reg.float()
        num_old = t_cls.shape[-1]
        new_slice = slice(num_old, s_cls.shape[-1])
        # mu+2sigma statistics only over anchors inside each unpadded image (padding is not image content).
        valid = grid.valid_mask(image_sizes)
        # Batch-summed terms are put on the release's per-batch-of-2 scale (see DistillConfig.release_batch).
        per_batch = distill.release_batch / s_cls.shape[0] if distill.release_batch else 1.0
        if distill.hccd:
            losses["hccd"], counts["n_hccd"] = hccd_loss(
                s_cls, t_cls, weight=distill.hccd_weight * per_batch, min_score=distill.hccd_min_score or 0.0, valid=valid,
                form=distill.hccd_form or "l2",
            )
        if distill.erd_box:
            losses["erd_box"], counts["n_erd_box"] = erd_box_loss(
                s_cls, s_reg, t_cls, t_reg, grid.points, grid.strides, nms_iou=distill.erd_box_nms_iou,
                T=distill.temperature, weight=distill.erd_box_weight * per_batch,
                scale_by_stride=distill.erd_box_stride_fix, valid=valid,
            )
        # With a new-class teacher, the boxes of new-class positives are distilled from it, not from the old teacher.
        new_pos = new_class_positives(asg, num_old) if new_teacher is not None else None
        if distill.dscrd:
            r = dscrd_loss(s_cls, s_reg, t_reg, asg, new_slice, T=distill.temperature,
                           ld_weight=distill.ld_weight * per_batch, vlr_weight=distill.vlr_weight * per_batch, exclude=new_pos)
            losses["ld"], losses["vlr"] = r["ld"], r["vlr"]
            counts["n_ld"], counts["n_vlr"] = r["n_pos"], r["n_vlr"]
        if distill.idfd:
            losses["idfd"], counts["n_idfd"] = idfd_loss(
                student.feats, teacher.feats, asg, ratio=distill.idfd_ratio, weight=distill.idfd_weight,
                zero_levels_without_positives=distill.idfd_zero_levels_without_positives,
                normalize=distill.idfd_normalize,
            )
        if new_teacher is not None and new_channels is not None:
            r = new_teacher_loss(s_cls, s_reg, new_teacher.cls.float().index_select(-1, new_channels), new_teacher.reg.float(),
                                 asg, num_old, T=distill.temperature, cls_weight=distill.new_teacher_weight * per_batch,
                                 ld_weight=distill.ld_weight * per_batch, min_score=distill.hccd_min_score or 0.0, valid=valid)
            losses["new_cls"], losses["new_ld"] = r["new_cls"], r["new_ld"]
            counts["n_new_cls"], counts["n_new_ld"] = r["n_new_cls"], r["n_new_ld"]
        if distill.kd_mismatch:
            losses["kd"] = kd_mismatch_loss(s_cls, t_cls, asg.pos_mask, new_slice, weight=distill.kd_weight,
                                            num_per_level=grid.num_per_level)
    total = torch.stack([v.float() for v in losses.values()]).sum()
    log: dict[str, Tensor] = {"loss": total.detach()}
    log.update({f"loss_{k}": v.detach().float() for k, v in losses.items()})
    log.update({k: v.detach().float() for k, v in counts.items()})
    return total, log
