"""The GFLv1 detector: backbone -> FPN -> GFL head, with loss and post-processing in one place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

from .anchors import AnchorGrid, make_anchor_grid
from .backbone import build_backbone
from .fpn import FPN
from .head import GFLHead, distance2bbox, integral
from .postprocess_settings import ACROSS_GROUPS_BLOCK, POSTPROCESS, STRIDES


def suppress_across_groups(boxes: Tensor, scores: Tensor, groups: Tensor, iou_thr: float) -> Tensor:
    """Which boxes to keep when a higher-scored box of an earlier group (a lower id) overlaps them at IoU > iou_thr.

    With groups 0 = the classes known before a step and 1 = the classes it added, a new-class box on an old defect
    goes where the distilled old channels score that place higher: the new classes never saw an old defect labelled
    "not new" (docs/METHOD_NOTES.md, "NMS across old and added classes"). Old boxes are never dropped by new ones
    (dropping both ways cost old-class AP on a validation split). Every pair is compared at once (Fast NMS: a dropped
    box still suppresses), in blocks of ACROSS_GROUPS_BLOCK rows so memory stays bounded however many boxes
    per-class NMS kept.
    """
    keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    for lo in range(0, len(boxes), ACROSS_GROUPS_BLOCK):
        hi = lo + ACROSS_GROUPS_BLOCK
        beaten = ((box_iou(boxes[lo:hi], boxes) > iou_thr) & (groups[None, :] < groups[lo:hi, None])
                  & (scores[None, :] > scores[lo:hi, None]))
        keep[lo:hi] = ~beaten.any(dim=1)
    return keep


@dataclass
class DenseOutput:
    """Raw dense predictions of a batch (see docs/ARCHITECTURE.md)."""

    cls: Tensor  # [B, A, C] logits
    reg: Tensor  # [B, A, 4, R+1] distribution logits
    feats: list[Tensor]  # FPN levels P3..P7
    grid: AnchorGrid


@dataclass
class DetectorConfig:
    """Architecture of a GFL detector; saved in every checkpoint so it can be rebuilt."""

    num_classes: int
    backbone: str = "tf_efficientnet_lite2"
    pretrained: bool | str = True
    fpn_channels: int = 256
    head_channels: int = 256
    head_convs: int = 4
    reg_max: int = 16
    frozen_stages: int = 1
    norm_eval: bool = True


class GFL(nn.Module):
    """GFLv1 dense detector. Input: uint8 or float images in 0-255 pixel units, [B, 3, H, W]."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.pretrained, cfg.frozen_stages, cfg.norm_eval)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn_channels, num_outs=len(STRIDES))
        self.head = GFLHead(cfg.num_classes, cfg.fpn_channels, cfg.head_channels, cfg.head_convs, cfg.reg_max, len(STRIDES))
        self.register_buffer("pixel_mean", torch.tensor(self.backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.backbone.std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def features(self, images: Tensor) -> list[Tensor]:
        """Normalise and run backbone + FPN."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        return self.fpn(self.backbone(x))

    def forward(self, images: Tensor) -> DenseOutput:
        """Dense class and box-distribution logits for every anchor of every level."""
        feats = self.features(images)
        cls, reg = self.head(feats)
        grid = make_anchor_grid([tuple(f.shape[-2:]) for f in feats], list(STRIDES), images.device)
        return DenseOutput(cls, reg, feats, grid)

    @torch.no_grad()
    def postprocess(
        self,
        out: DenseOutput,
        image_sizes: list[tuple[int, int]],
        score_thr: float = POSTPROCESS["score_thr"],
        nms_pre: int = POSTPROCESS["nms_pre"],
        iou_thr: float = POSTPROCESS["iou_thr"],
        max_per_img: int = POSTPROCESS["max_per_img"],
        agnostic: bool = POSTPROCESS["agnostic"],
        class_groups: Optional[Sequence[int]] = POSTPROCESS["class_groups"],
    ) -> list[dict[str, Tensor]]:
        """Boxes in input pixels per image: score filter, top nms_pre per level, NMS (class-aware, or across classes
        with `agnostic`), across `class_groups` (one group id per class, see `suppress_across_groups`), top max_per_img."""
        results = []
        level_slices, start = [], 0
        for n in out.grid.num_per_level:
            level_slices.append(slice(start, start + n))
            start += n
        num_classes = out.cls.shape[-1]
        for b, (h, w) in enumerate(image_sizes):
            boxes_all, scores_all, labels_all = [], [], []
            for sl in level_slices:
                scores = out.cls[b, sl].float().sigmoid().flatten()
                keep = (scores > score_thr).nonzero(as_tuple=True)[0]
                if keep.numel() > nms_pre:
                    keep = keep[scores[keep].topk(nms_pre).indices]
                anchor = keep // num_classes + sl.start
                dist = integral(out.reg[b, anchor].float()) * out.grid.strides[anchor, None]
                boxes = distance2bbox(out.grid.points[anchor], dist)
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
                boxes_all.append(boxes)
                scores_all.append(scores[keep])
                labels_all.append(keep % num_classes)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
            keep = batched_nms(boxes, scores, torch.zeros_like(labels) if agnostic else labels, iou_thr)
            if class_groups is not None:
                group = torch.as_tensor(list(class_groups), device=labels.device)[labels[keep]]
                keep = keep[suppress_across_groups(boxes[keep], scores[keep], group, iou_thr)]
            keep = keep[:max_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]],
                scales: list[float | tuple[float, float]] | None = None, **kw) -> list[dict[str, Tensor]]:
        """Detect on a padded batch; boxes are mapped back to original pixels when `scales` ((sx, sy) or one float) is given."""
        results = self.postprocess(self(images), image_sizes, **kw)
        if scales is not None:
            for r, s in zip(results, scales):
                sx, sy = (s, s) if isinstance(s, (int, float)) else s
                r["boxes"] = r["boxes"] / r["boxes"].new_tensor([sx, sy, sx, sy])
        return results


def build_detector(cfg: DetectorConfig) -> GFL:
    """Build a GFL detector from its config."""
    return GFL(cfg)
