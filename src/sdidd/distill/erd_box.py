"""ERD's box elastic response selection: mu+2sigma on teacher box logits, NMS, then student-score-weighted KL."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..model.head import distance2bbox, integral
from .kl import distribution_kl


def box_logit_mask(teacher_reg: Tensor, k_sigma: float = 2.0) -> Tensor:
    """Anchors whose max over the 4*(R+1) raw teacher box logits exceeds mean + k*std of the image: [B, A] bool."""
    peak = teacher_reg.detach().flatten(2).amax(dim=-1)  # [B, A]
    thr = peak.mean(dim=1, keepdim=True) + k_sigma * peak.std(dim=1, keepdim=True)
    return peak > thr


def decode_teacher_boxes(reg: Tensor, points: Tensor, strides: Tensor, scale_by_stride: bool = True) -> Tensor:
    """Boxes [N, 4] from box logits [N, 4, R+1] around points [N, 2]; distances x stride unless the as-released quirk."""
    dist = integral(reg)  # [N, 4] in stride units
    if scale_by_stride:
        dist = dist * strides.to(dist.dtype)[:, None]
    # scale_by_stride=False keeps the released code's bug: stride units used as pixels (boxes <= 16 px).
    return distance2bbox(points, dist)


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
) -> tuple[Tensor, int]:
    """ERD box distillation: weight * sum over NMS-kept mu+2sigma anchors of sum_k w_a KL_T / 4, summed over images."""
    num_old = teacher_cls.shape[-1]
    bins = student_reg.shape[-1]
    sel_mask = box_logit_mask(teacher_reg)  # [B, A]
    # Zero-size sum keeps a graph to the student, so an empty selection is an exact 0 with a finite gradient.
    loss = student_reg.flatten()[:0].sum()
    kept_total = 0
    for b in range(student_reg.shape[0]):
        idx = sel_mask[b].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        t_reg = teacher_reg[b, idx].detach()
        with torch.no_grad():
            boxes = decode_teacher_boxes(t_reg, points[idx], strides[idx], scale_by_stride)
            scores, labels = teacher_cls[b, idx].sigmoid().max(dim=-1)
            keep = batched_nms(boxes.float(), scores.float(), labels, nms_iou)
        idx = idx[keep]
        kl = distribution_kl(student_reg[b, idx].reshape(-1, bins), t_reg[keep].reshape(-1, bins), T).view(-1, 4)
        # Weight: the student's own old-class confidence (detached), as in ERD.
        w = student_cls[b, idx, :num_old].detach().sigmoid().amax(dim=-1)
        loss = loss + (kl * w[:, None]).sum() / 4.0
        kept_total += int(idx.numel())
    return weight * loss, kept_total
