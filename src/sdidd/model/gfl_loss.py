"""GFLv1 training loss: Quality Focal Loss, Distribution Focal Loss and GIoU on a shared ATSS :class:`Assignment`.

Sync-free, fixed shapes: QFL runs densely over every anchor and channel; GIoU/DFL run on a fixed number
of slots per image that is known to hold every positive (:meth:`Assignment.positive_slots`) and are
multiplied by the positive mask (inputs of non-positive slots are finite stand-ins, so no NaN/inf reaches
a masked entry or its gradient). Counts and normalisers stay 0-dim tensors. Labels are model-channel
indices; the ``trained`` channel mask [C] decides which channels get QFL supervision (old classes get
none, docs/METHOD_NOTES.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor

from .anchors import AnchorGrid
from .assigner import Assignment, assign_targets  # noqa: F401  (re-exported: the loss's entry point)
from .head import bbox2distance, distance2bbox, integral

__all__ = [
    "aligned_iou",
    "assign_targets",
    "distribution_focal_loss",
    "giou_loss",
    "gfl_loss",
    "quality_focal_loss",
]


def quality_focal_loss(
    logits: Tensor, score_targets: Tensor, beta: float = 2.0, channel_mask: Optional[Tensor] = None
) -> Tensor:
    """QFL summed over classes: BCE(sigma, q) * |q - sigma|^beta (q = IoU at the GT class, 0 elsewhere).

    ``channel_mask`` [C] (bool or 0/1) multiplies the elementwise loss before the sum: masked channels
    get neither loss nor gradient.
    """
    sigma = logits.sigmoid()
    factor = (score_targets - sigma).abs().pow(beta)
    loss = F.binary_cross_entropy_with_logits(logits, score_targets, reduction="none") * factor
    if channel_mask is not None:
        loss = loss * channel_mask.to(loss.dtype)
    return loss.sum(-1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL: cross-entropy on the two bins around a continuous target, weighted by closeness. [..., R+1], [...] -> [...]."""
    left = target.floor().long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    # One log_softmax for both bins (= two cross-entropies); targets are clamped to < R, so right <= R.
    logp = F.log_softmax(logits, dim=-1)
    lp_left = logp.gather(-1, left[..., None]).squeeze(-1)
    lp_right = logp.gather(-1, right[..., None]).squeeze(-1)
    return -(lp_left * w_left + lp_right * w_right)


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of row i of `a` with row i of `b` (xyxy, any leading dims)."""
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of aligned xyxy boxes [..., 4] -> [...]; torchvision's formula without its boolean-mask indexing."""
    x1, y1, x2, y2 = pred.unbind(-1)
    x1g, y1g, x2g, y2g = target.unbind(-1)
    # Intersection: zero unless both extents are positive (clamp(0) gives the same value and gradient).
    inter = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0) * (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - (area_c - union) / (area_c + eps))


def _ddp_normalisers(qfl_norm: Tensor, weight_sum: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """Under torch.distributed: (N / W, max(S, 1) / W), N and S the QFL normaliser and score sum over all ranks.

    DDP averages gradients over W ranks, so these per-rank normalisers make the update equal to one
    process normalising the whole batch by its totals. None outside a process group (the plain GFL path).
    One all_reduce on a device tensor: no host sync.
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return None
    t = torch.stack([qfl_norm.detach().double(), weight_sum.detach().double()])
    tdist.all_reduce(t)  # every rank calls this once per gfl_loss, with or without positives
    w = float(tdist.get_world_size())
    return (t[0].clamp(min=1.0) / w).float(), (t[1].clamp(min=1.0) / w).float()


def gfl_loss(
    cls: Tensor,
    reg: Tensor,
    grid: AnchorGrid,
    assignment: Assignment,
    trained: Tensor,
    qfl_weight: float = 1.0,
    giou_weight: float = 2.0,
    dfl_weight: float = 0.25,
    beta: float = 2.0,
    qfl_ignore: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """GFL losses {'qfl', 'giou', 'dfl', 'num_pos'} for logits `cls` [B, A, C] and `reg` [B, A, 4, R+1].

    ``qfl_ignore`` [B, A, C] bool: entries left out of QFL (no target, no gradient), e.g. an old class's
    channel where its teacher is confident but no pseudo-label lies.

    ``trained`` [C] or per image [B, C] bool: channels that get QFL supervision; the GIoU/DFL weight of a positive is its
    max predicted score over those channels (detached). Normalisers as mmdetection GFL: QFL by
    Σ_images max(#pos_img, 1); GIoU and DFL by Σ weights (clamped >= 1). Under torch.distributed they
    are the totals over all ranks divided by the world size (one all_reduce; every rank must call this).
    """
    cls, reg = cls.float(), reg.float()  # losses in fp32 under AMP
    batch, _, num_classes = cls.shape
    reg_max = reg.shape[-1] - 1
    trained = trained.to(device=cls.device, dtype=torch.bool)
    if trained.dim() == 2:  # per image [B, C] (replayed old images supervise other channels): broadcast over anchors
        trained = trained[:, None, :]
    pos = assignment.pos_mask  # [B, A]

    # Box terms on K fixed slots per image that hold every positive (see Assignment.positive_slots):
    # fixed shapes, no sync, and far fewer rows than all anchors. Non-positive slots are masked to 0.
    idx, slot_pos = assignment.positive_slots()  # [B, K]
    slot_f = slot_pos.to(cls.dtype)
    strides = grid.strides[idx][..., None]  # [B, K, 1]
    points = grid.points[idx] / strides  # work in stride units, as GFL does
    slot_reg = reg.gather(1, idx[:, :, None, None].expand(-1, -1, *reg.shape[2:]))  # [B, K, 4, R+1]
    pred_boxes = distance2bbox(points, integral(slot_reg))  # [B, K, 4]
    # Non-positive slots get a finite stand-in target (a 2x2 box on the anchor): their terms are multiplied
    # by 0, and a finite input keeps the product (and its gradient) an exact 0 instead of NaN.
    stand_in = torch.cat([points - 1.0, points + 1.0], dim=-1)
    slot_gt = assignment.assigned_boxes.gather(1, idx[..., None].expand(-1, -1, 4)) / strides
    gt_boxes = torch.where(slot_pos[..., None], slot_gt, stand_in)

    slot_cls = cls.detach().gather(1, idx[..., None].expand(-1, -1, num_classes))
    weights = slot_cls.sigmoid().masked_fill(~trained, 0.0).amax(-1) * slot_f  # [B, K], 0 off the positives

    # QFL on every anchor: score target IoU(pred, GT) at channel `label` of each positive, 0 elsewhere.
    iou = aligned_iou(pred_boxes.detach(), gt_boxes) * slot_f
    labels = assignment.assigned_labels.gather(1, idx).clamp(min=0)  # non-positive slots: value 0 (a no-op)
    score_targets = cls.new_zeros(cls.shape)  # contiguous, so the flat view below is valid
    score_targets.view(batch, -1).scatter_(1, idx * num_classes + labels, iou)  # slots are distinct anchors
    qfl_mask = trained if qfl_ignore is None else trained & ~qfl_ignore
    qfl_sum = quality_focal_loss(cls, score_targets, beta, channel_mask=qfl_mask).sum()

    num_pos = pos.sum()
    qfl_norm = pos.sum(dim=1).clamp(min=1).sum().to(cls.dtype)  # Σ_img max(#pos_img, 1)
    weight_sum = weights.sum()
    ddp = _ddp_normalisers(qfl_norm, weight_sum)
    if ddp is None:
        qfl_avg, avg = qfl_norm, weight_sum.clamp(min=1.0)
    else:
        qfl_avg, avg = ddp
    qfl = qfl_sum / qfl_avg
    giou = (giou_loss(pred_boxes, gt_boxes) * weights).sum() / avg
    dist_targets = bbox2distance(points, gt_boxes, reg_max - 0.1)  # [B, K, 4]
    dfl = (distribution_focal_loss(slot_reg, dist_targets) * weights[..., None]).sum() / 4.0 / avg
    return {
        "qfl": qfl_weight * qfl,
        "giou": giou_weight * giou,
        "dfl": dfl_weight * dfl,
        "num_pos": num_pos.to(cls.dtype),
    }
