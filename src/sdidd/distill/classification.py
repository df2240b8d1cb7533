"""Strategy (1), high-confidence classification distillation (HCCD) = ERD's classification response selection."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import above_mean_std


def confident_mask(
    teacher_cls: Tensor, k_sigma: float = 2.0, min_score: float = 0.0, valid: Optional[Tensor] = None
) -> Tensor:
    """Per image, anchors whose max teacher sigmoid exceeds mean + k*std over the image's anchors: [B, A] bool.

    `valid` [B, A] (anchors inside the unpadded image) restricts both the statistics and the selection.
    `min_score` > 0 also requires an absolute score: in a new-task image without old objects the relative
    rule still picks the teacher's "most confident" anchors, which lie on the new defects themselves.
    """
    score = teacher_cls.detach().sigmoid().amax(dim=-1)  # [B, A]
    return above_mean_std(score, k_sigma, valid) & (score >= min_score)


def hccd_loss(
    student_cls: Tensor,
    teacher_cls: Tensor,
    weight: float = 1.0,
    min_score: float = 0.0,
    valid: Optional[Tensor] = None,
    form: str = "l2",
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Distance between student and teacher old-class outputs on mu+2sigma-confident anchors, mean per image, summed.

    `form` "l2": squared difference of the raw logits (the paper and release). "bce": binary cross-entropy of
    the student's logits against the teacher's sigmoid scores, minus its value at the teacher (0 at agreement):
    its gradient σ(z_s) − σ(z_t) is bounded, so far-negative logits of classes absent at an anchor, which L2
    weighs like any other, no longer dominate the step (docs/METHOD_NOTES.md, "HCCD on scores").
    `mask` [B, A]: the selection when the caller computed it already (:func:`confident_mask`).
    Returns (loss, number of selected anchors as a 0-dim tensor).
    """
    num_old = teacher_cls.shape[-1]
    if mask is None:
        mask = confident_mask(teacher_cls, min_score=min_score, valid=valid)  # [B, A]
    s, t = student_cls[..., :num_old], teacher_cls.detach()
    if form == "bce":
        p = t.sigmoid()
        sq = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
              - F.binary_cross_entropy_with_logits(t, p, reduction="none")).sum(-1)  # [B, A], >= 0
    else:
        sq = (s - t).pow(2).sum(-1)  # [B, A], summed over old classes
    count = mask.sum(dim=1)  # [B]
    # Masked sums instead of a mean over a possibly empty set: an empty image contributes an exact 0, never NaN.
    per_image = torch.where(mask, sq, torch.zeros_like(sq)).sum(dim=1) / (count.clamp(min=1) * num_old)
    return weight * per_image.sum(), count.sum()
