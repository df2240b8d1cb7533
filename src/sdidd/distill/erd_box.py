"""ERD's box elastic response selection: mu+2sigma on teacher box logits, NMS, then student-score-weighted KL.

Host syncs: this is the one place in the loss path that has them, by necessity. NMS keeps a
data-dependent number of boxes, so the mu+2sigma selection is turned into indices (``nonzero``) and
ONE class- and image-aware ``batched_nms`` runs over the whole batch (idxs = image * C + label).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..model.head import distance2bbox, integral
from .kl import distribution_kl
from .stats import above_mean_std


def box_logit_mask(teacher_reg: Tensor, k_sigma: float = 2.0, valid: Optional[Tensor] = None) -> Tensor:
    """Anchors whose max over the 4*(R+1) raw teacher box logits exceeds mean + k*std of the image: [B, A] bool.

    `valid` [B, A] (anchors inside the unpadded image) restricts both the statistics and the selection.
    """
    peak = teacher_reg.detach().flatten(2).amax(dim=-1)  # [B, A]
    return above_mean_std(peak, k_sigma, valid)


def decode_teacher_boxes(reg: Tensor, points: Tensor, strides: Tensor, scale_by_stride: bool = True) -> Tensor:
    """Boxes [N, 4] from box logits [N, 4, R+1] around points [N, 2]; distances x stride unless the as-released quirk."""
    dist = integral(reg)  # [N, 4] in stride units
    if scale_by_stride:
        dist = dist * strides.to(dist.dtype)[:, None]
    # scale_by_stride=False keeps the released code's bug: stride units used as pixels (boxes <= 16 px).
    return distance2bbox(points, dist)


def _grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """One ``batched_nms`` for all groups (image x label); kept indices by decreasing score.

    batched_nms separates groups by offsetting boxes by group * (max coordinate + 1), which assumes
    non-negative coordinates; decoded teacher boxes reach below 0, so they are shifted to start at 0
    first (IoU is shift-invariant). float64 keeps the large offsets of a whole batch exact.
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    b = boxes.double()
    return batched_nms(b - b.min(), scores.double(), groups, iou_threshold)


def erd_box_loss(
    student_cls: Tensor,
    student_reg: Tensor,
    teacher_cls: Tensor,
    teacher_reg: Tensor,
    points: Tensor,
    strides: Tensor,
    nms_iou: float = 0.005,
    T: float = 10.0,
    weight: float = 0.25,
    scale_by_stride: bool = True,
    valid: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """ERD box distillation: weight * sum over NMS-kept mu+2sigma anchors of sum_k w_a KL_T / 4, summed over images.

    Returns (loss, number of kept anchors as a 0-dim tensor). NMS never crosses images or labels.
    """
    num_old = teacher_cls.shape[-1]
    bins = student_reg.shape[-1]
    sel_mask = box_logit_mask(teacher_reg, valid=valid)  # [B, A]
    with torch.no_grad():
        b_idx, a_idx = sel_mask.nonzero(as_tuple=True)  # sync (documented exception)
        t_reg = teacher_reg[b_idx, a_idx]
        boxes = decode_teacher_boxes(t_reg, points[a_idx], strides[a_idx], scale_by_stride)
        scores, labels = teacher_cls[b_idx, a_idx].sigmoid().max(dim=-1)
        keep = _grouped_nms(boxes, scores, b_idx * num_old + labels, nms_iou)
    b_idx, a_idx = b_idx[keep], a_idx[keep]
    # An empty selection gives a zero-size sum: an exact 0 that keeps a graph to the student.
    kl = distribution_kl(student_reg[b_idx, a_idx].reshape(-1, bins), t_reg[keep].reshape(-1, bins), T).view(-1, 4)
    # Weight: the student's own old-class confidence (detached), as in ERD.
    w = student_cls[b_idx, a_idx, :num_old].detach().sigmoid().amax(dim=-1)
    loss = (kl * w[:, None]).sum() / 4.0
    return weight * loss, torch.ones_like(keep).sum()
