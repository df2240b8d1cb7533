"""Old-class pseudo-labels (sdidd+): the teacher's confident detections on the new images become old-class targets.

Without them an old defect that appears in a new-class image is unlabelled: the old channels get no
ground truth there, and the features drift away from it. Before the step, the frozen teacher detects on
every training image once; a detection of old class c is kept when its score is at least that class's
threshold and it does not overlap a new-class ground-truth box (IoU < `distill.pseudo_overlap_iou`).
The threshold comes from the teacher's own scores on these images (no constant tuned on a test set): the
larger of mean + k·std of its class-c detection scores (k = `distill.pseudo_sigmas`) and the highest
score it gives class c on a new-class ground-truth box, an object that is certainly not of class c
(on NEU-DET, where few new images hold an old defect, the first alone kept 298 boxes at a precision
near 0.1; with the second, 22 at about 0.45: docs/results/small_data.md). Kept detections are added to
the image's boxes with the old class's channel, and the step then trains every channel on ground truth
(old channels: the pseudo-labels).
"""
from __future__ import annotations

import math

import dataclasses
import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from ..data import DetectionDataset
from .evaluation import detect

log = logging.getLogger(__name__)

Detections = dict[int, dict[str, np.ndarray]]  # image_id -> boxes [N, 4] xyxy original pixels, scores [N], labels [N]


def teacher_detections(teacher: torch.nn.Module, dataset: DetectionDataset, data_cfg: Any, device: torch.device,
                       workers: Optional[int] = None) -> Detections:
    """The teacher's post-processed detections (score >= 0.05, NMS) on every image of `dataset`, in fp32."""
    return detect(teacher, dataset, data_cfg, device, workers=workers)


def score_thresholds(detections: Detections, num_old: int, sigmas: float,
                     ceilings: Optional[np.ndarray] = None) -> np.ndarray:
    """Per old class: mean + `sigmas`·std of the teacher's detection scores of that class (inf with fewer than 2),
    raised to `ceilings` (the class's highest score on new-class objects, see :func:`negative_ceilings`)."""
    scores = np.concatenate([d["scores"] for d in detections.values()] or [np.zeros(0)])
    labels = np.concatenate([d["labels"] for d in detections.values()] or [np.zeros(0, dtype=np.int64)])
    thr = np.full(num_old, np.inf)
    for c in range(num_old):
        s = scores[labels == c]
        if len(s) >= 2:
            thr[c] = s.mean() + sigmas * s.std()
    return thr if ceilings is None else np.maximum(thr, ceilings)


def _overlap_with_gt(det: dict[str, np.ndarray], gt_boxes: np.ndarray) -> np.ndarray:
    """Per detection: its highest IoU with the image's ground-truth boxes (0 without any)."""
    if len(gt_boxes) == 0 or len(det["boxes"]) == 0:
        return np.zeros(len(det["scores"]), dtype=np.float32)
    iou = box_iou(torch.as_tensor(det["boxes"], dtype=torch.float32), torch.as_tensor(np.asarray(gt_boxes), dtype=torch.float32))
    return iou.amax(dim=1).numpy()


def negative_ceilings(dataset: DetectionDataset, detections: Detections, num_old: int, overlap_iou: float) -> np.ndarray:
    """Per old class: the teacher's highest score of that class on a new-class GT box (IoU >= `overlap_iou`), else 0.

    Those objects are certainly not old defects, so a pseudo-label must score above what the teacher gives them.
    """
    ceil = np.zeros(num_old)
    for r in dataset.records:
        det = detections.get(int(r.image_id))
        if det is None or len(det["scores"]) == 0:
            continue
        new_gt = np.asarray(r.boxes).reshape(-1, 4)[np.asarray(r.labels) >= num_old]  # labelled old defects are old defects
        on_new = (_overlap_with_gt(det, new_gt) >= overlap_iou) & (det["labels"] < num_old)
        if on_new.any():
            np.maximum.at(ceil, det["labels"][on_new].astype(np.int64), det["scores"][on_new])
    return ceil


def add_pseudo_labels(dataset: DetectionDataset, detections: Detections, thresholds: np.ndarray,
                      overlap_iou: float) -> tuple[DetectionDataset, dict[str, Any]]:
    """`dataset` (model-channel labels; its boxes are the new-class GT) with the kept teacher detections added."""
    records, added, images = [], np.zeros(len(thresholds), dtype=np.int64), 0
    for r in dataset.records:
        det = detections.get(int(r.image_id))
        if det is None or len(det["scores"]) == 0:
            records.append(r)
            continue
        labels = det["labels"].astype(np.int64)
        keep = (labels < len(thresholds)) & (det["scores"] >= thresholds[np.clip(labels, 0, len(thresholds) - 1)])
        if keep.any():  # a detection on a new-class object is not an old defect
            keep &= _overlap_with_gt(det, np.asarray(r.boxes).reshape(-1, 4)) < overlap_iou
        if not keep.any():
            records.append(r)
            continue
        boxes = np.concatenate([np.asarray(r.boxes, dtype=np.float32).reshape(-1, 4), det["boxes"][keep].astype(np.float32)])
        new_labels = np.concatenate([np.asarray(r.labels, dtype=np.int64), labels[keep]])
        records.append(dataclasses.replace(r, boxes=boxes, labels=new_labels))
        added += np.bincount(labels[keep], minlength=len(thresholds))[: len(thresholds)]
        images += 1
    stats = {"pseudo_boxes": int(added.sum()), "pseudo_images": images, "images": len(dataset.records),
             "per_class": added.tolist(), "thresholds": [round(float(t), 4) for t in thresholds]}
    return dataset.with_records(records), stats


def pseudo_labelled(dataset: DetectionDataset, teacher: torch.nn.Module, data_cfg: Any, device: torch.device,
                    sigmas: float, overlap_iou: float, workers: Optional[int] = None,
                    labelled: Sequence[int] = ()) -> tuple[DetectionDataset, dict[str, Any]]:
    """Detect with the teacher once, derive the per-class thresholds, add the kept detections (logged).

    Old classes in `labelled` (channels the dataset labels itself) get no pseudo-labels.
    """
    num_old = int(teacher.cfg.num_classes)
    detections = teacher_detections(teacher, dataset, data_cfg, device, workers=workers)
    thresholds = score_thresholds(detections, num_old, sigmas, negative_ceilings(dataset, detections, num_old, overlap_iou))
    thresholds[list(labelled)] = np.inf
    out, stats = add_pseudo_labels(dataset, detections, thresholds, overlap_iou)
    names = dataset.classes[:num_old]
    log.info(f"pseudo-labels: {stats['pseudo_boxes']} old-class boxes on {stats['pseudo_images']} of {stats['images']} "
             f"training images ({', '.join(_per_class(c, n, t) for c, n, t in zip(names, stats['per_class'], thresholds))})")
    return out, stats


def _per_class(name: str, n: int, threshold: float) -> str:
    """'crazing 12 at score >= 0.41', or why a class got none (labelled in the data, or never detected here)."""
    if not math.isfinite(threshold):
        return f"{name} 0 (labelled in the data, or no detection of it)"
    return f"{name} {n} at score >= {threshold:.2f}"
