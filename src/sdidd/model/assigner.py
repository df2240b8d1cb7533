"""Anchor selection rules: ATSS positives, LD's valuable localisation region and fine-grained imitation masks.

All functions work on one image: anchors ``[A, 4]`` (all levels concatenated) against GTs ``[G, 4]``,
both ``xyxy`` pixels. They are vectorised over anchors and boxes; only the (5) levels are looped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import box_iou, distance_box_iou

# ATSS's "anchor centre strictly inside the GT" margin, in pixels (mmdet's 0.01).
_INSIDE_EPS = 0.01


def anchor_boxes(points: Tensor, strides: Tensor, octave_scale: float = 8.0) -> Tensor:
    """Square anchors of side ``octave_scale * stride`` centred on ``points`` ([A, 2], [A]) -> [A, 4]."""
    half = 0.5 * octave_scale * strides.to(points.dtype)[:, None]
    return torch.cat([points - half, points + half], dim=1)


def _centres(boxes: Tensor) -> Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) * 0.5


@dataclass
class ATSSResult:
    """Output of :func:`atss_assign` for one image."""

    assigned: Tensor  # [A] long: index of the assigned GT, -1 for negatives
    iou: Tensor  # [A, G] IoU of every anchor with every GT
    threshold: Tensor  # [G] mean + std of the candidates' IoUs (the ATSS threshold)

    @property
    def pos_mask(self) -> Tensor:
        """Boolean [A] mask of the positive anchors."""
        return self.assigned >= 0


def atss_candidates(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """Indices [K, G] of the ``topk`` anchors per level nearest (centre L2) to each GT's centre."""
    # Squared distance has the same order as the L2 distance, so the sqrt is skipped.
    dist = (_centres(anchors)[:, None, :] - _centres(gt_boxes)[None, :, :]).pow(2).sum(-1)  # [A, G]
    picks, start = [], 0
    for n in num_per_level:
        k = min(topk, n)
        if k > 0:
            picks.append(dist[start : start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    if not picks:
        return torch.zeros((0, gt_boxes.shape[0]), dtype=torch.long, device=anchors.device)
    return torch.cat(picks, dim=0)


def atss_assign(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, topk: int = 9) -> ATSSResult:
    """ATSS: per-level top-k centre-distance candidates, IoU >= mean + std and centre inside the GT."""
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    iou = box_iou(anchors, gt_boxes)  # [A, G]
    assigned = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return ATSSResult(assigned, iou, iou.new_zeros((num_gt,)))

    cand = atss_candidates(anchors, num_per_level, gt_boxes, topk)  # [K, G]
    cand_iou = iou.gather(0, cand)  # [K, G]
    threshold = cand_iou.mean(0) + cand_iou.std(0)  # unbiased std, as torch / mmdet default
    is_pos = cand_iou >= threshold[None, :]

    # Centre strictly inside the GT: the smallest of the four side distances exceeds the margin.
    cx = _centres(anchors)[cand]  # [K, G, 2]
    side = torch.stack(
        [
            cx[..., 0] - gt_boxes[None, :, 0],
            cx[..., 1] - gt_boxes[None, :, 1],
            gt_boxes[None, :, 2] - cx[..., 0],
            gt_boxes[None, :, 3] - cx[..., 1],
        ],
        dim=-1,
    )
    is_pos &= side.amin(-1) > _INSIDE_EPS

    # Scatter qualifying IoUs into an [A, G] matrix (-inf elsewhere); each column's candidates are distinct.
    masked = torch.full_like(iou, float("-inf"))
    masked.scatter_(0, cand, torch.where(is_pos, cand_iou, torch.full_like(cand_iou, float("-inf"))))
    best, arg = masked.max(dim=1)  # several qualifying GTs -> the max-IoU one
    assigned = torch.where(best > float("-inf"), arg, assigned)
    return ATSSResult(assigned, iou, threshold)


def vlr_region(
    anchors: Tensor,
    gt_boxes: Tensor,
    threshold: Tensor,
    low: float = 0.25,
    iou: Optional[Tensor] = None,
) -> Tensor:
    """LD's valuable localisation region: IoU(a, g*) where low*thr_g <= DIoU(a, g) < thr_g for some g, else 0."""
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0 or num_anchors == 0:
        return anchors.new_zeros((num_anchors,))
    if iou is None:
        iou = box_iou(anchors, gt_boxes)
    # torchvision's DIoU is IoU - rho^2(centres) / (c^2 + 1e-7), c = enclosing box diagonal, pairwise [A, G].
    diou = distance_box_iou(anchors, gt_boxes)
    thr = threshold[None, :]
    in_vlr = (diou >= low * thr) & (diou < thr)
    masked = torch.where(in_vlr, iou, torch.full_like(iou, float("-inf")))
    best = masked.max(dim=1).values  # g* = argmax IoU over the GTs whose VLR holds the anchor
    return torch.where(best > float("-inf"), best, torch.zeros_like(best))


def finegrained_mask(
    anchors: Tensor, gt_boxes: Tensor, ratio: float = 0.5, iou: Optional[Tensor] = None
) -> Tensor:
    """Fine-grained imitation mask [A]: IoU(a, g) > ratio * max_a' IoU(a', g) for some GT g."""
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0 or num_anchors == 0:
        return torch.zeros((num_anchors,), dtype=torch.bool, device=anchors.device)
    if iou is None:
        iou = box_iou(anchors, gt_boxes)
    # Relative per-GT threshold: a hard GT whose best anchor IoU is low still gets imitation positions.
    best = iou.max(dim=0).values  # [G]
    return (iou > ratio * best[None, :]).any(dim=1)
