"""Strategy (3), IoU-driven difficulty-aware feature distillation (IDFD): MSE of FPN features on fine-grained regions."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model.assigner import finegrained_mask


def idfd_loss(
    student_feats: list[Tensor],
    teacher_feats: list[Tensor],
    anchors: Tensor,
    num_per_level: list[int],
    gt_boxes: list[Tensor],
    ratio: float = 0.5,
    weight: float = 2.0,
    zero_levels_without_positives: bool = False,
    pos_masks: Optional[Tensor] = None,
    normalize: bool = False,
) -> tuple[Tensor, int]:
    """weight * sum over levels of the MSE (masked positions of the batch x channels) on the fine-grained mask.

    `normalize` divides each level's MSE by the teacher's mean squared feature at the same positions,
    making the term independent of the feature scale of the backbone/FPN (the released plain MSE was
    tuned for ResNet-50 FPN features; on other necks its magnitude can swamp the detection loss).
    """
    if zero_levels_without_positives and pos_masks is None:
        raise ValueError("zero_levels_without_positives needs pos_masks ([B, A] bool ATSS positives)")
    batch = student_feats[0].shape[0]
    with torch.no_grad():
        masks = torch.stack(
            [finegrained_mask(anchors, gt_boxes[b].to(anchors), ratio) for b in range(batch)]
        )  # [B, A]
    # Exact 0 with a graph to every student level, so empty levels still get a (zero) gradient.
    loss = sum((f.flatten()[:0].sum() for f in student_feats), student_feats[0].new_zeros(()))
    total = 0
    level_masks = masks.split(num_per_level, dim=1)
    level_pos = pos_masks.split(num_per_level, dim=1) if pos_masks is not None else [None] * len(num_per_level)
    for fs, ft, m, pos in zip(student_feats, teacher_feats, level_masks, level_pos):
        bsz, ch, h, w = fs.shape
        if m.shape[1] != h * w:
            raise ValueError(f"level has {m.shape[1]} anchors but a {h}x{w} feature map")
        m = m.view(bsz, h, w)  # anchor index within a level = y * W + x
        n = int(m.sum())
        total += n
        if n == 0:
            continue
        # As-released quirk: a level without ATSS positives contributes nothing to loss_im.
        if zero_levels_without_positives and not bool(pos.any()):
            continue
        target = ft.detach().permute(0, 2, 3, 1)[m]  # [n, C]
        mse = (fs.permute(0, 2, 3, 1)[m] - target).pow(2).sum() / (n * ch)
        if normalize:
            mse = mse / target.pow(2).mean().clamp(min=1e-6)
        loss = loss + mse
    return weight * loss, total
