"""GFLv1 training loss: ATSS targets, Quality Focal Loss, Distribution Focal Loss and GIoU."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.distributed as tdist
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from .anchors import AnchorGrid
from .assigner import atss_assign
from .head import bbox2distance, distance2bbox, integral


@dataclass
class GFLTargets:
    """ATSS assignment of a batch, flattened over images and anchors."""

    pos_mask: Tensor  # [B, A] bool
    labels: Tensor  # [P] class index (in the trained channel range) of each positive
    boxes: Tensor  # [P, 4] assigned GT box of each positive, input pixels


def quality_focal_loss(logits: Tensor, score_targets: Tensor, beta: float = 2.0) -> Tensor:
    """QFL summed over classes: BCE(sigma, q) * |q - sigma|^beta (q = IoU at the GT class, 0 elsewhere)."""
    sigma = logits.sigmoid()
    factor = (score_targets - sigma).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, score_targets, reduction="none") * factor).sum(-1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL: cross-entropy on the two bins around a continuous target, weighted by closeness. [N, R+1], [N] -> [N]."""
    left = target.floor().long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    return F.cross_entropy(logits, left, reduction="none") * w_left + F.cross_entropy(logits, right, reduction="none") * w_right


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row i of `a` with row i of `b` (xyxy)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def _ddp_normalisers(num_pos: int, weight_sum: Tensor) -> tuple[float, float] | None:
    """Under torch.distributed: (max(N, 1) / W, max(S, 1) / W) with N, S the positives / score sums of all ranks.

    DDP averages gradients over W ranks, so these per-rank normalisers make the update equal to one
    process normalising the whole batch by its totals. None outside a process group (the plain GFL path).
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return None
    t = torch.stack([torch.tensor(float(num_pos), dtype=torch.float64, device=weight_sum.device), weight_sum.detach().double()])
    tdist.all_reduce(t)  # every rank calls this once per gfl_loss, with or without positives
    w = tdist.get_world_size()
    total_pos, total_w = t.tolist()
    return max(total_pos, 1.0) / w, max(total_w, 1.0) / w


def assign_targets(grid: AnchorGrid, gt_boxes: list[Tensor], gt_labels: list[Tensor], topk: int = 9) -> GFLTargets:
    """Run ATSS per image and gather positives of the whole batch."""
    anchors = grid.boxes
    masks, labels, boxes = [], [], []
    for g_boxes, g_labels in zip(gt_boxes, gt_labels):
        assigned = atss_assign(anchors, grid.num_per_level, g_boxes, topk=topk).assigned
        pos = assigned >= 0
        masks.append(pos)
        labels.append(g_labels[assigned[pos]])
        boxes.append(g_boxes[assigned[pos]])
    return GFLTargets(torch.stack(masks), torch.cat(labels), torch.cat(boxes))


def gfl_loss(
    cls: Tensor,
    reg: Tensor,
    grid: AnchorGrid,
    targets: GFLTargets,
    qfl_weight: float = 1.0,
    giou_weight: float = 2.0,
    dfl_weight: float = 0.25,
    beta: float = 2.0,
) -> dict[str, Tensor]:
    """GFL losses for logits `cls` [B, A, C] (only the channels being trained) and `reg` [B, A, 4, R+1].

    Normalisers follow GFL: QFL by the number of positives, GIoU and DFL by the sum of the positives'
    predicted scores (clamped >= 1). Under torch.distributed they are the totals over all ranks divided
    by the world size (one all_reduce; every rank must call this), so DDP matches one process.
    """
    cls, reg = cls.float(), reg.float()  # losses in fp32 under AMP
    reg_max = reg.shape[-1] - 1
    pos = targets.pos_mask
    num_pos = int(pos.sum())
    score_targets = torch.zeros_like(cls)
    zero = cls.sum() * 0.0 + reg.sum() * 0.0  # keeps the regression branch in the graph: DDP needs a gradient for every parameter
    if num_pos == 0:
        qfl = quality_focal_loss(cls, score_targets, beta).sum()
        ddp = _ddp_normalisers(0, zero.detach())
        if ddp is not None:
            qfl = qfl / ddp[0]
        return {"qfl": qfl_weight * qfl, "giou": zero, "dfl": zero, "num_pos": torch.tensor(0.0)}

    batch_idx, anchor_idx = pos.nonzero(as_tuple=True)
    strides = grid.strides[anchor_idx][:, None]
    points = grid.points[anchor_idx] / strides  # work in stride units, as GFL does
    pos_reg = reg[batch_idx, anchor_idx]  # [P, 4, R+1]
    pred_boxes = distance2bbox(points, integral(pos_reg))
    gt_boxes = targets.boxes / strides
    weights = cls[batch_idx, anchor_idx].detach().sigmoid().max(-1).values

    iou = aligned_iou(pred_boxes.detach(), gt_boxes)
    score_targets[batch_idx, anchor_idx, targets.labels] = iou
    ddp = _ddp_normalisers(num_pos, weights.sum())
    qfl = quality_focal_loss(cls, score_targets, beta).sum() / (max(num_pos, 1) if ddp is None else ddp[0])

    avg = weights.sum().clamp(min=1.0) if ddp is None else ddp[1]
    giou = (generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none") * weights).sum() / avg
    dist_targets = bbox2distance(points, gt_boxes, reg_max - 0.1)
    dfl = distribution_focal_loss(pos_reg.reshape(-1, reg_max + 1), dist_targets.reshape(-1))
    dfl = (dfl.reshape(-1, 4) * weights[:, None]).sum() / 4.0 / avg
    return {
        "qfl": qfl_weight * qfl,
        "giou": giou_weight * giou,
        "dfl": dfl_weight * dfl,
        "num_pos": torch.tensor(float(num_pos)),
    }
