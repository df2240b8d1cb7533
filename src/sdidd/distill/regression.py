"""Strategy (2), dual-stage cascade regression distillation (DSCRD): LD's KL on ATSS positives and on the VLR.

Both selections come from the step's shared :class:`~sdidd.model.assigner.Assignment` (the same ATSS as the
GFL loss, on the step's = new-class GT boxes); the KL is computed densely and masked: no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model.anchors import AnchorGrid
from ..model.assigner import Assignment
from ..model.gfl_loss import aligned_iou
from ..model.head import distance2bbox, integral
from .kl import distribution_kl


def teacher_box_fit(teacher_reg: Tensor, assignment: Assignment, grid: AnchorGrid) -> Tensor:
    """[B, A] IoU of the teacher's decoded box at each anchor with that anchor's GT box (0 in an image without GT).

    The GT box is the assigned one at a positive, elsewhere the anchor's highest-IoU GT (the one its VLR value
    comes from). Detached, dense, no host sync.
    """
    with torch.no_grad():
        batch, num_anchors = teacher_reg.shape[:2]
        if assignment.gt_boxes.shape[1] == 0:
            return teacher_reg.new_zeros((batch, num_anchors))
        boxes = distance2bbox(grid.points, integral(teacher_reg.float()) * grid.strides[:, None])  # [B, A, 4]
        nearest = torch.where(assignment.pos_mask, assignment.assigned, assignment.iou.argmax(-1))
        gt = assignment.gt_boxes.gather(1, nearest[..., None].expand(-1, -1, 4))
        fit = aligned_iou(boxes, gt)
        return torch.where(assignment.gt_valid.gather(1, nearest), fit, torch.zeros_like(fit))


def dscrd_loss(
    student_cls: Tensor,
    student_reg: Tensor,
    teacher_reg: Tensor,
    assignment: Assignment,
    new_slice: slice,
    T: float = 10.0,
    ld_weight: float = 0.25,
    vlr_weight: float = 0.25,
    exclude: Optional[Tensor] = None,
    teacher_fit: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Box-distribution KL on ATSS positives ('ld', predicted-IoU weighted) and on the VLR ('vlr', IoU weighted).

    A positive's weight is the student's best score among the channels of its box's kind (new or old classes).

    `exclude` [B, A] bool drops positives from LD (those a new-class teacher distils instead). `teacher_fit` [B, A]
    (:func:`teacher_box_fit`) multiplies both weights (``distill.dscrd_teacher_iou``). Summed over the batch. Returns ``{'ld', 'vlr'}`` losses and ``{'n_pos', 'n_vlr'}`` counts, all 0-dim tensors.
    """
    bins = student_reg.shape[-1]
    batch, num_anchors = student_reg.shape[:2]
    with torch.no_grad():
        pos = assignment.pos_mask  # stage 1 (top-k per level) + stage 2 (IoU >= mean+std, centre inside) = ATSS
        if exclude is not None:
            pos = pos & ~exclude
        region = assignment.vlr_region()  # [B, A], IoU(a, g*) inside the VLR, else 0
        # w_a: the student's quality score (its predicted IoU) over the classes of the positive's box, detached,
        # 0 off the positives: the new classes' channels at new-class boxes (the paper's case); the old classes'
        # at old-class boxes (pseudo-labels or labelled old defects), where the new channels score ~0 and would
        # switch LD off.
        # (sigmoid of each slice, not a slice of one sigmoid: a contiguous tensor takes another SIMD path, 1 ulp apart)
        cls = student_cls.detach()
        w_new = cls[..., new_slice].sigmoid().amax(dim=-1)
        if new_slice.start > 0:
            old_box = assignment.assigned_labels < new_slice.start
            w_new = torch.where(old_box, cls[..., :new_slice.start].sigmoid().amax(dim=-1), w_new)
        w = w_new * pos.to(student_cls.dtype)
        if teacher_fit is not None:
            w = w * teacher_fit.to(w.dtype)
            region = region * teacher_fit.to(region.dtype)
    # One dense KL for every anchor; positives may also lie in the VLR (DIoU <= IoU). Masked anchors are
    # multiplied by an exact 0, which keeps the graph to the student with a zero gradient there.
    kl = distribution_kl(student_reg.reshape(-1, bins), teacher_reg.reshape(-1, bins), T)
    kl_sum = kl.view(batch, num_anchors, 4).sum(-1)  # [B, A], summed over the 4 sides
    ld = (w.to(kl_sum.dtype) * kl_sum).sum() / 4.0
    vlr = (region.to(kl_sum.dtype) * kl_sum).sum() / 16.0
    return {"ld": ld_weight * ld, "vlr": vlr_weight * vlr, "n_pos": pos.sum(), "n_vlr": (region > 0).sum()}


def kd_mismatch_loss(
    student_cls: Tensor,
    teacher_cls: Tensor,
    pos_mask: Tensor,
    new_slice: slice,
    T: float = 2.0,
    weight: float = 0.25,
    num_per_level: Optional[list[int]] = None,
) -> Tensor:
    """As-released quirk (ablation only): class KL of student NEW-class vs teacher OLD-class logits on positives.

    The released ``loss_kd`` softmaxes the student's new-class channels against the teacher's old-class
    channels (it only runs because both have 3); LD compares the same channels. KL is the mean over
    channels x T^2, averaged over positives. With ``num_per_level`` the mean is taken per FPN level over
    the batch and summed over levels, exactly as released; without it, one mean over all positives.
    """
    student_new = student_cls[..., new_slice]
    if student_new.shape[-1] != teacher_cls.shape[-1]:
        raise ValueError("kd_mismatch_loss needs as many new-class channels as teacher (old) channels")
    channels = teacher_cls.shape[-1]
    kl = distribution_kl(student_new.reshape(-1, channels), teacher_cls.reshape(-1, channels), T)
    kl = kl.view(pos_mask.shape)  # [B, A]
    kl = torch.where(pos_mask, kl, torch.zeros_like(kl))
    if num_per_level is None:
        return weight * kl.sum() / pos_mask.sum().clamp(min=1)
    total = kl.flatten()[:0].sum()
    for kl_l, m_l in zip(kl.split(num_per_level, dim=1), pos_mask.split(num_per_level, dim=1)):
        total = total + kl_l.sum() / m_l.sum().clamp(min=1)  # empty level -> 0, like mmdet's avg_factor
    return weight * total
