"""Anchor selection rules: ATSS positives, LD's valuable localisation region and fine-grained imitation masks.

The batch is assigned once (:func:`assign_targets`): anchors ``[A, 4]`` (all levels concatenated) against
padded GTs ``[B, G, 4]`` (``xyxy`` pixels, label -1 on padded rows). The resulting :class:`Assignment`
holds the anchor-GT IoU and the ATSS thresholds, which the GFL loss and every distillation selection
(DSCRD positives and VLR, IDFD's fine-grained mask) reuse. Everything is vectorised over images, anchors
and boxes; only the (5) FPN levels are looped. No host synchronisation: the only shape checks are on
tensor shapes, never on tensor values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .anchors import AnchorGrid, anchor_boxes

__all__ = [
    "ATSSResult",
    "Assignment",
    "anchor_boxes",
    "assign_targets",
    "atss_assign",
    "atss_assign_batched",
    "atss_candidates",
    "finegrained_mask",
    "pairwise_iou",
    "vlr_region",
]

# ATSS's "anchor centre strictly inside the GT" margin, in pixels (mmdet's 0.01).
_INSIDE_EPS = 0.01
_NEG_INF = float("-inf")


def _centres(boxes: Tensor) -> Tensor:
    return (boxes[..., :2] + boxes[..., 2:]) * 0.5


def pairwise_iou(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of anchors [A, 4] with GTs [..., G, 4] -> [..., A, G] (torchvision's box_iou arithmetic, batched)."""
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])  # [A]
    area_g = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])  # [..., G]
    lt = torch.max(anchors[:, None, :2], gt_boxes[..., None, :, :2])  # [..., A, G, 2]
    rb = torch.min(anchors[:, None, 2:], gt_boxes[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_g[..., None, :] - inter)


def _diou_from_iou(anchors: Tensor, gt_boxes: Tensor, iou: Tensor, eps: float = 1e-7) -> Tensor:
    """DIoU [B, A, G] = IoU - rho^2(centres) / (c^2 + eps), c = enclosing diagonal (torchvision's formula), from a given IoU."""
    lti = torch.min(anchors[None, :, None, :2], gt_boxes[:, None, :, :2])  # [B, A, G, 2]
    rbi = torch.max(anchors[None, :, None, 2:], gt_boxes[:, None, :, 2:])
    whi = (rbi - lti).clamp(min=0)
    diag = whi[..., 0] ** 2 + whi[..., 1] ** 2 + eps
    ca, cg = _centres(anchors), _centres(gt_boxes)  # [A, 2], [B, G, 2]
    rho = (ca[None, :, None, 0] - cg[:, None, :, 0]) ** 2 + (ca[None, :, None, 1] - cg[:, None, :, 1]) ** 2
    return iou - rho / diag


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


@dataclass
class Assignment:
    """ATSS assignment of a padded batch, shared by the GFL loss and every distillation selection."""

    assigned: Tensor  # [B, A] long: index into G of the assigned GT, -1 for negatives
    iou: Tensor  # [B, A, G] anchor-GT IoU; 0 in padded columns (which no rule ever selects)
    threshold: Tensor  # [B, G] ATSS threshold mean + std of the candidates' IoUs; 0 in padded columns
    gt_valid: Tensor  # [B, G] bool: real (unpadded) GT rows
    gt_boxes: Tensor  # [B, G, 4] xyxy input pixels; padded rows zeroed
    gt_labels: Tensor  # [B, G] long model-channel index, -1 on padded rows
    anchors: Tensor  # [A, 4] the square anchors the IoUs were computed with
    num_per_level: list[int]
    num_candidates: int  # ATSS candidates per GT (sum over levels of min(topk, level size))

    @property
    def pos_mask(self) -> Tensor:
        """[B, A] bool mask of the positive anchors."""
        return self.assigned >= 0

    @property
    def num_pos(self) -> Tensor:
        """0-dim long tensor: number of positives in the batch."""
        return self.pos_mask.sum()

    def positive_slots(self) -> tuple[Tensor, Tensor]:
        """(anchor index [B, K] long, is-positive [B, K] bool): K fixed slots per image holding every positive.

        A positive is one of its GT's ATSS candidates, so an image has at most G * num_candidates of
        them: the top-K of the positive mask with K = min(A, that bound) catches all of them with a
        shape known without looking at the data (no sync), usually far fewer rows than all anchors.
        """
        pos = self.pos_mask
        batch, num_anchors = pos.shape
        k = min(num_anchors, self.gt_boxes.shape[1] * self.num_candidates)
        if k == num_anchors:
            idx = torch.arange(num_anchors, device=pos.device).expand(batch, num_anchors)
        else:
            idx = pos.to(torch.float32).topk(k, dim=1, sorted=False).indices
        return idx, pos.gather(1, idx)

    @property
    def assigned_boxes(self) -> Tensor:
        """[B, A, 4] assigned GT box of every anchor (GT 0's box, or zeros, at negatives)."""
        b, a = self.assigned.shape
        if self.gt_boxes.shape[1] == 0:
            return self.gt_boxes.new_zeros((b, a, 4))
        idx = self.assigned.clamp(min=0)[..., None].expand(b, a, 4)
        return self.gt_boxes.gather(1, idx)

    @property
    def assigned_labels(self) -> Tensor:
        """[B, A] long label of every anchor's assigned GT, -1 at negatives."""
        if self.gt_labels.shape[1] == 0:
            return torch.full_like(self.assigned, -1)
        lab = self.gt_labels.gather(1, self.assigned.clamp(min=0))
        return torch.where(self.pos_mask, lab, torch.full_like(lab, -1))

    def inside_boxes(self, min_label: int = 0) -> Tensor:
        """[B, A] bool: the anchor's centre lies inside a real GT box whose channel is >= `min_label`."""
        centre = _centres(self.anchors)  # [A, 2]
        x, y = centre[None, :, None, 0], centre[None, :, None, 1]
        b = self.gt_boxes[:, None]  # [B, 1, G, 4]
        inside = (x > b[..., 0]) & (x < b[..., 2]) & (y > b[..., 1]) & (y < b[..., 3])  # [B, A, G]
        wanted = self.gt_valid & (self.gt_labels >= min_label)  # [B, G]
        return (inside & wanted[:, None, :]).any(dim=-1)

    def vlr_region(self, low: float = 0.25) -> Tensor:
        """[B, A] VLR value (see :func:`vlr_region`) from the stored IoU and thresholds."""
        return vlr_region(self.anchors, self.gt_boxes, self.threshold, low, iou=self.iou, gt_valid=self.gt_valid)

    def finegrained_mask(self, ratio: float = 0.5) -> Tensor:
        """[B, A] fine-grained imitation mask (see :func:`finegrained_mask`) from the stored IoU."""
        return finegrained_mask(self.anchors, self.gt_boxes, ratio, iou=self.iou, gt_valid=self.gt_valid)


def atss_candidates(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """Indices [..., K, G] of the ``topk`` anchors per level nearest (centre L2) to each GT centre ([..., G, 4])."""
    # Squared distance has the same order as the L2 distance, so the sqrt is skipped.
    ca, cg = _centres(anchors), _centres(gt_boxes)
    dist = (ca[:, None, :] - cg[..., None, :, :]).pow(2).sum(-1)  # [..., A, G]
    picks, start = [], 0
    for n in num_per_level:
        k = min(topk, n)
        if k > 0:
            picks.append(dist[..., start : start + n, :].topk(k, dim=-2, largest=False).indices + start)
        start += n
    if not picks:
        return torch.zeros((*gt_boxes.shape[:-2], 0, gt_boxes.shape[-2]), dtype=torch.long, device=anchors.device)
    return torch.cat(picks, dim=-2)


def atss_assign_batched(
    anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, gt_valid: Tensor, topk: int = 9
) -> tuple[Tensor, Tensor, Tensor]:
    """ATSS on a padded batch: (assigned [B, A], iou [B, A, G], threshold [B, G]); invalid GT rows never assigned."""
    batch, num_gt = gt_boxes.shape[:2]
    num_anchors = anchors.shape[0]
    iou = pairwise_iou(anchors, gt_boxes)  # [B, A, G]
    iou = torch.where(gt_valid[:, None, :], iou, torch.zeros_like(iou))
    assigned = torch.full((batch, num_anchors), -1, dtype=torch.long, device=anchors.device)
    cand = atss_candidates(anchors, num_per_level, gt_boxes, topk)  # [B, K, G]
    if num_gt == 0 or num_anchors == 0 or cand.shape[1] == 0:
        return assigned, iou, iou.new_zeros((batch, num_gt))

    cand_iou = iou.gather(1, cand)  # [B, K, G]
    threshold = cand_iou.mean(1) + cand_iou.std(1)  # unbiased std, as torch / mmdet default
    is_pos = (cand_iou >= threshold[:, None, :]) & gt_valid[:, None, :]

    # Centre strictly inside the GT: the smallest of the four side distances exceeds the margin.
    ctr = _centres(anchors)[cand]  # [B, K, G, 2]
    g = gt_boxes[:, None, :, :]  # [B, 1, G, 4]
    side = torch.stack(
        [ctr[..., 0] - g[..., 0], ctr[..., 1] - g[..., 1], g[..., 2] - ctr[..., 0], g[..., 3] - ctr[..., 1]], dim=-1
    )
    is_pos &= side.amin(-1) > _INSIDE_EPS

    # Scatter qualifying IoUs into [B, A, G] (-inf elsewhere); a column's candidates are distinct anchors.
    masked = torch.full_like(iou, _NEG_INF)
    masked.scatter_(1, cand, torch.where(is_pos, cand_iou, torch.full_like(cand_iou, _NEG_INF)))
    best, arg = masked.max(dim=2)  # several qualifying GTs -> the max-IoU one (first on ties)
    assigned = torch.where(best > _NEG_INF, arg, assigned)
    threshold = torch.where(gt_valid, threshold, torch.zeros_like(threshold))
    return assigned, iou, threshold


def atss_assign(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, topk: int = 9) -> ATSSResult:
    """ATSS for one image: per-level top-k centre-distance candidates, IoU >= mean + std and centre inside the GT."""
    valid = torch.ones((1, gt_boxes.shape[0]), dtype=torch.bool, device=anchors.device)
    assigned, iou, threshold = atss_assign_batched(anchors, num_per_level, gt_boxes[None], valid, topk)
    return ATSSResult(assigned[0], iou[0], threshold[0])


def assign_targets(grid: AnchorGrid, gt_boxes: Tensor, gt_labels: Tensor, topk: int = 9) -> Assignment:
    """ATSS once for the whole padded batch (gt_boxes [B, G, 4], gt_labels [B, G], -1 = padding)."""
    anchors = grid.boxes
    gt_labels = gt_labels.to(device=anchors.device, dtype=torch.long)
    gt_valid = gt_labels >= 0
    # Padded rows may hold anything: zero them so no NaN/inf can reach a masked-out computation.
    boxes = gt_boxes.to(device=anchors.device, dtype=anchors.dtype)
    boxes = torch.where(gt_valid[..., None], boxes, torch.zeros_like(boxes))
    assigned, iou, threshold = atss_assign_batched(anchors, grid.num_per_level, boxes, gt_valid, topk)
    num_candidates = sum(min(topk, n) for n in grid.num_per_level)
    return Assignment(
        assigned, iou, threshold, gt_valid, boxes, gt_labels, anchors, list(grid.num_per_level), num_candidates
    )


def _as_batch(x: Optional[Tensor], batched: bool) -> Optional[Tensor]:
    return x if x is None or batched else x[None]


def vlr_region(
    anchors: Tensor,
    gt_boxes: Tensor,
    threshold: Tensor,
    low: float = 0.25,
    iou: Optional[Tensor] = None,
    gt_valid: Optional[Tensor] = None,
) -> Tensor:
    """LD's valuable localisation region: IoU(a, g*) where low*thr_g <= DIoU(a, g) < thr_g for some g, else 0.

    One image (gt_boxes [G, 4], threshold [G], iou [A, G]) -> [A], or a batch ([B, G, 4], [B, G],
    [B, A, G], gt_valid [B, G]) -> [B, A]. A given ``iou`` is reused for both IoU and DIoU.
    """
    batched = gt_boxes.dim() == 3
    gt_boxes, threshold = _as_batch(gt_boxes, batched), _as_batch(threshold, batched)
    iou, gt_valid = _as_batch(iou, batched), _as_batch(gt_valid, batched)
    batch, num_gt = gt_boxes.shape[:2]
    num_anchors = anchors.shape[0]
    if num_gt == 0 or num_anchors == 0:
        out = anchors.new_zeros((batch, num_anchors))
        return out if batched else out[0]
    if iou is None:
        iou = pairwise_iou(anchors, gt_boxes)
    diou = _diou_from_iou(anchors, gt_boxes, iou)
    thr = threshold[:, None, :]
    in_vlr = (diou >= low * thr) & (diou < thr)
    if gt_valid is not None:
        in_vlr &= gt_valid[:, None, :]
    masked = torch.where(in_vlr, iou, torch.full_like(iou, _NEG_INF))
    best = masked.amax(dim=2)  # g* = argmax IoU over the GTs whose VLR holds the anchor
    out = torch.where(best > _NEG_INF, best, torch.zeros_like(best))
    return out if batched else out[0]


def finegrained_mask(
    anchors: Tensor,
    gt_boxes: Tensor,
    ratio: float = 0.5,
    iou: Optional[Tensor] = None,
    gt_valid: Optional[Tensor] = None,
) -> Tensor:
    """Fine-grained imitation mask: IoU(a, g) > ratio * max_a' IoU(a', g) for some GT g; [A] or batched [B, A]."""
    batched = gt_boxes.dim() == 3
    gt_boxes, iou, gt_valid = _as_batch(gt_boxes, batched), _as_batch(iou, batched), _as_batch(gt_valid, batched)
    batch, num_gt = gt_boxes.shape[:2]
    num_anchors = anchors.shape[0]
    if num_gt == 0 or num_anchors == 0:
        out = torch.zeros((batch, num_anchors), dtype=torch.bool, device=anchors.device)
        return out if batched else out[0]
    if iou is None:
        iou = pairwise_iou(anchors, gt_boxes)
    # Relative per-GT threshold: a hard GT whose best anchor IoU is low still gets imitation positions.
    best = iou.amax(dim=1)  # [B, G]
    hit = iou > ratio * best[:, None, :]
    if gt_valid is not None:
        hit &= gt_valid[:, None, :]
    out = hit.any(dim=2)
    return out if batched else out[0]
