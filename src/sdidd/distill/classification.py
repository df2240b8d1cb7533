"""Strategy (1), high-confidence classification distillation (HCCD) = ERD's classification response selection."""
from __future__ import annotations

from typing import Optional

import torch
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
) -> tuple[Tensor, Tensor]:
    """L2 between student old-class logits and teacher logits on mu+2sigma-confident anchors, mean per image, summed.

    Returns (loss, number of selected anchors as a 0-dim tensor).
    """
    num_old = teacher_cls.shape[-1]
    mask = confident_mask(teacher_cls, min_score=min_score, valid=valid)  # [B, A]
    sq = (student_cls[..., :num_old] - teacher_cls.detach()).pow(2).sum(-1)  # [B, A], summed over old classes
    count = mask.sum(dim=1)  # [B]
    # Masked sums instead of a mean over a possibly empty set: an empty image contributes an exact 0, never NaN.
    per_image = torch.where(mask, sq, torch.zeros_like(sq)).sum(dim=1) / (count.clamp(min=1) * num_old)
    return weight * per_image.sum(), count.sum()
