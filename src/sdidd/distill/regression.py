"""Strategy (2), dual-stage cascade regression distillation (DSCRD): LD's KL on ATSS positives and on the VLR."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model.assigner import atss_assign, vlr_region
from .kl import distribution_kl


def dscrd_loss(
    student_cls: Tensor,
    student_reg: Tensor,
    teacher_reg: Tensor,
    anchors: Tensor,
    num_per_level: list[int],
    gt_boxes: list[Tensor],
    new_slice: slice,
    T: float = 10.0,
    ld_weight: float = 0.25,
    vlr_weight: float = 0.25,
    topk: int = 9,
) -> dict:
    """Box-distribution KL on new-GT ATSS positives ('ld') and IoU-weighted on the VLR ('vlr'), summed over the batch.

    Returns ``{'ld', 'vlr'}`` (0-dim tensors), ``{'n_pos', 'n_vlr'}`` (ints) and ``'pos_mask'`` ([B, A] bool,
    the ATSS positives, reusable by :func:`kd_mismatch_loss` and the IDFD level-zeroing quirk; not a loss).
    """
    bins = student_reg.shape[-1]
    batch, num_anchors = student_reg.shape[:2]
    zero = student_reg.flatten()[:0].sum()  # exact 0 that still carries a graph to the student
    ld, vlr = zero, zero
    n_pos, n_vlr = 0, 0
    pos_mask = torch.zeros((batch, num_anchors), dtype=torch.bool, device=student_reg.device)
    for b in range(batch):
        gts = gt_boxes[b].to(anchors)
        if gts.shape[0] == 0:
            continue
        with torch.no_grad():
            # Stage 1 (top-k nearest per level) and stage 2 (IoU >= mean+std, centre inside) are exactly ATSS.
            res = atss_assign(anchors, num_per_level, gts, topk=topk)
            region = vlr_region(anchors, gts, res.threshold, iou=res.iou)  # [A], IoU(a, g*) or 0
        pos = res.assigned >= 0
        in_vlr = region > 0
        pos_mask[b] = pos
        # One KL evaluation over the union; positives may also lie in the VLR (DIoU <= IoU).
        idx = (pos | in_vlr).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        kl = distribution_kl(student_reg[b, idx].reshape(-1, bins), teacher_reg[b, idx].reshape(-1, bins), T)
        kl_sum = kl.view(-1, 4).sum(-1)  # [n], summed over the 4 sides
        # w_a: the student's new-class quality score (its predicted IoU), detached.
        w = student_cls[b, idx][:, new_slice].detach().sigmoid().amax(dim=-1)
        sel_pos = pos[idx].to(kl_sum.dtype)
        ld = ld + (sel_pos * w * kl_sum).sum() / 4.0
        vlr = vlr + (region[idx].to(kl_sum.dtype) * kl_sum).sum() / 16.0
        n_pos += int(pos.sum())
        n_vlr += int(in_vlr.sum())
    return {"ld": ld_weight * ld, "vlr": vlr_weight * vlr, "n_pos": n_pos, "n_vlr": n_vlr, "pos_mask": pos_mask}


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
