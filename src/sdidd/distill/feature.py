"""Strategy (3), IoU-driven difficulty-aware feature distillation (IDFD): MSE of FPN features on fine-grained regions.

The fine-grained mask comes from the step's shared Assignment (its stored anchor-GT IoU); the MSE is a
dense masked sum per level: no host sync.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..model.assigner import Assignment


def idfd_loss(
    student_feats: list[Tensor],
    teacher_feats: list[Tensor],
    assignment: Assignment,
    ratio: float = 0.5,
    weight: float = 2.0,
    zero_levels_without_positives: bool = False,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """weight * sum over levels of the MSE (masked positions of the batch x channels) on the fine-grained mask.

    `zero_levels_without_positives` (as released) drops a level without ATSS positives in the batch.
    `normalize` divides each level's MSE by the teacher's mean squared feature at the same positions,
    making the term independent of the feature scale of the backbone/FPN (the released plain MSE was
    tuned for ResNet-50 FPN features; on other necks its magnitude can swamp the detection loss).
    Returns (loss, number of masked positions as a 0-dim tensor).
    """
    num_per_level = assignment.num_per_level
    with torch.no_grad():
        masks = assignment.finegrained_mask(ratio)  # [B, A]
    level_masks = masks.split(num_per_level, dim=1)
    level_pos = assignment.pos_mask.split(num_per_level, dim=1)
    loss = student_feats[0].new_zeros((), dtype=torch.float32)
    for fs, ft, m, pos in zip(student_feats, teacher_feats, level_masks, level_pos):
        bsz, ch, h, w = fs.shape
        if m.shape[1] != h * w:
            raise ValueError(f"level has {m.shape[1]} anchors but a {h}x{w} feature map")
        mf = m.view(bsz, 1, h, w).to(torch.float32)  # anchor index within a level = y * W + x
        denom = (mf.sum() * ch).clamp(min=1)  # masked positions x channels; an empty level gives an exact 0
        target = ft.detach().float()
        # fp32 sums: squared features summed over a level can overflow fp16 under AMP.
        mse = ((fs.float() - target).pow(2) * mf).sum() / denom
        if normalize:
            mse = mse / ((target.pow(2) * mf).sum() / denom).clamp(min=1e-6)
        if zero_levels_without_positives:  # as-released quirk: a level without ATSS positives adds nothing
            mse = mse * pos.any().to(mse.dtype)
        loss = loss + mse  # every student level stays in the graph, with a zero gradient when empty
    return weight * loss, masks.sum()
