"""COCO-style box evaluation with pycocotools (per-class AP50 / AP, group mAP50), and its reports.

All AP numbers come from ``COCOeval`` (101-point interpolation, maxDets 100, area 'all'); nothing here
re-implements AP. Values are percentages (0-100); a class without ground truth has AP NaN and is left
out of every mean. Running a model over a dataset to get its detections is `engine/evaluation.py`.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from .run_files import write_json

__all__ = ["EvalResult", "evaluate_detections", "format_table", "result_to_dict", "save_result_json",
           "coco_results", "save_coco_results"]


@dataclass
class EvalResult:
    """Per-class AP50/AP, group mAP50 and overall mAP50/mAP, all in percent (NaN: class without GT)."""

    per_class: dict[str, dict[str, float]]
    groups: dict[str, float]
    map50: float
    map: float
    num_gt: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A result rebuilt from JSON has None where NaN was (JSON has no NaN): restore NaN.
        self.per_class = {c: {k: _nan(v) for k, v in d.items()} for c, d in self.per_class.items()}
        self.groups = {g: _nan(v) for g, v in self.groups.items()}
        self.map50, self.map = _nan(self.map50), _nan(self.map)


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def to_numpy(x: Any, dtype: type, cols: int | None = None) -> np.ndarray:
    """Tensor / list / array / None -> numpy of `dtype` (empty inputs get the right trailing shape)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float().numpy() if np.issubdtype(dtype, np.floating) else x.numpy()
    a = np.asarray(x if x is not None else [], dtype=dtype)
    return a.reshape(-1, cols) if cols else a.reshape(-1)


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _coco_gt(records: Sequence[Any], num_classes: int, class_ids: list[int], names: list[str]) -> COCO:
    images, anns = [], []
    keep = set(class_ids)
    for r in records:
        images.append({"id": int(r.image_id), "width": int(r.width), "height": int(r.height)})
        boxes, labels = to_numpy(r.boxes, np.float64, 4), to_numpy(r.labels, np.int64)
        for (x1, y1, x2, y2), lab in zip(boxes.tolist(), labels.tolist()):
            if lab not in keep:
                continue
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": int(r.image_id), "category_id": int(lab) + 1,
                         "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": i + 1, "name": names[i]} for i in range(num_classes)]}
    gt.createIndex()
    return gt


def _coco_dt(gt: COCO, detections: Mapping[int, Mapping[str, Any]], class_ids: list[int]) -> COCO:
    # Built directly instead of via gt.loadRes, which fails on an empty result list; fields as loadRes sets them.
    keep = np.asarray(sorted(set(class_ids)), dtype=np.int64)
    known = set(gt.imgs)
    anns = []
    for image_id, det in detections.items():
        if int(image_id) not in known:
            raise ValueError(f"detections for image_id {image_id}, which is not among the evaluated records")
        boxes = to_numpy(det["boxes"], np.float64, 4)
        scores, labels = to_numpy(det["scores"], np.float64), to_numpy(det["labels"], np.int64)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        sel = np.isin(labels, keep)
        for (x1, y1, x2, y2), s, lab in zip(boxes[sel].tolist(), scores[sel].tolist(), labels[sel].tolist()):
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": int(lab) + 1,
                         "bbox": [x1, y1, w, h], "area": w * h, "score": s, "iscrowd": 0})
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "annotations": anns,
                  "categories": list(gt.dataset["categories"])}
    dt.createIndex()
    return dt


def evaluate_detections(records: Sequence[Any], classes: list[str], detections: Mapping[int, Mapping[str, Any]],
                        class_ids: Optional[list[int]] = None,
                        groups: Optional[Mapping[str, list[int]]] = None) -> EvalResult:
    """Score detections (original-pixel xyxy, global labels, keyed by image_id) against records with COCOeval."""
    class_ids = list(range(len(classes))) if class_ids is None else sorted({int(c) for c in class_ids})
    if any(not 0 <= c < len(classes) for c in class_ids):
        raise ValueError(f"class_ids {class_ids} outside 0..{len(classes) - 1}")
    per_class: dict[str, dict[str, float]] = {}
    num_gt: dict[str, int] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        gt = _coco_gt(records, len(classes), class_ids, classes)
        dt = _coco_dt(gt, detections, class_ids)
        if class_ids:
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = sorted(gt.imgs)
            ev.params.catIds = [c + 1 for c in class_ids]
            ev.evaluate()
            ev.accumulate()
            prec = ev.eval["precision"]  # [iou T, recall R, class K, area A, maxDets M]; -1 where no GT
            a_all = list(ev.params.areaRngLbl).index("all")
            m100 = list(ev.params.maxDets).index(100)
            t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    for k, c in enumerate(class_ids):
        name = classes[c]
        num_gt[name] = len(gt.getAnnIds(catIds=[c + 1]))
        p_all = prec[:, :, k, a_all, m100]
        p50 = p_all[t50]
        per_class[name] = {
            "ap50": float(p50[p50 > -1].mean() * 100) if (p50 > -1).any() else float("nan"),
            "ap": float(p_all[p_all > -1].mean() * 100) if (p_all > -1).any() else float("nan"),
        }
    map50 = _nanmean(v["ap50"] for v in per_class.values())
    map_ = _nanmean(v["ap"] for v in per_class.values())
    group_maps: dict[str, float] = {}
    evaluated = set(class_ids)
    for g, ids in (groups or {}).items():
        group_maps[g] = _nanmean(per_class[classes[i]]["ap50"] for i in ids if i in evaluated)
    group_maps.setdefault("all", map50)
    return EvalResult(per_class=per_class, groups=group_maps, map50=map50, map=map_, num_gt=num_gt)


def coco_results(records: Sequence[Any], classes: Sequence[str], detections: Mapping[int, Mapping[str, Any]],
                 category_ids: Optional[Mapping[str, int]] = None, root: Optional[str | Path] = None) -> list[dict[str, Any]]:
    """A COCO results list (what `COCO.loadRes` and other tools read) in the dataset's own terms.

    `image_id` is the record's (a COCO json's own id), `category_id` the annotation file's own id of the
    class (`category_ids`, by name) or else channel + 1, `bbox` [x, y, w, h] in original pixels; each
    entry also names its image (`file_name`, relative to `root` when the image lies under it).
    """
    base = Path(root).resolve() if root else None
    out: list[dict[str, Any]] = []
    for r in records:
        det = detections.get(int(r.image_id))
        if det is None:
            continue
        name = Path(r.file)
        if base is not None:
            try:
                name = name.resolve().relative_to(base)
            except ValueError:
                pass
        boxes = to_numpy(det["boxes"], np.float64, 4)
        scores, labels = to_numpy(det["scores"], np.float64), to_numpy(det["labels"], np.int64)
        for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            cls = classes[lab]
            cid = int(category_ids[cls]) if category_ids and cls in category_ids else lab + 1
            out.append({"image_id": int(r.image_id), "file_name": name.as_posix(), "category_id": cid,
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(s, 5)})
    return out


def save_coco_results(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Write a COCO results list as JSON (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    return path


def _fmt(v: Optional[float], width: int = 7) -> str:
    return f"{'n/a':>{width}}" if v is None or math.isnan(v) else f"{v:{width}.1f}"


def format_table(result: EvalResult, groups: Optional[Iterable[str]] = None) -> str:
    """Fixed-width text table: one row per class (AP50, AP), then group mAP50 rows and the 'all' row.

    `groups` picks and orders the group rows (names, or a mapping whose keys are used); default: all.
    """
    names = list(result.per_class)
    all_label = "all (mAP50, mAP)"
    w = max([len(n) for n in names] + [len(f"mAP50 {g}") for g in result.groups] + [len(all_label)]) + 1
    has_gt = bool(result.num_gt)
    head = f"{'class':<{w}}" + (f"{'#gt':>6}" if has_gt else "") + f"{'AP50':>7}{'AP':>7}"
    lines = [head, "-" * len(head)]
    for n in names:
        gt = f"{result.num_gt.get(n, 0):>6d}" if has_gt else ""
        lines.append(f"{n:<{w}}{gt}{_fmt(result.per_class[n].get('ap50'))}{_fmt(result.per_class[n].get('ap'))}")
    lines.append("-" * len(head))
    pad = " " * 6 if has_gt else ""
    shown = list(groups) if groups is not None else [g for g in result.groups if g != "all"]
    for g in shown:
        if g != "all" and g in result.groups:
            lines.append(f"{'mAP50 ' + g:<{w}}{pad}{_fmt(result.groups[g])}")
    lines.append(f"{all_label:<{w}}{pad}{_fmt(result.map50)}{_fmt(result.map)}")
    return "\n".join(lines)


def _json_num(v: float) -> Optional[float]:
    return None if v is None or math.isnan(v) else round(float(v), 4)


def result_to_dict(result: EvalResult) -> dict[str, Any]:
    """JSON-ready dict (NaN -> None); EvalResult(**d) rebuilds the result."""
    return {
        "per_class": {c: {k: _json_num(v) for k, v in d.items()} for c, d in result.per_class.items()},
        "groups": {g: _json_num(v) for g, v in result.groups.items()},
        "map50": _json_num(result.map50),
        "map": _json_num(result.map),
        "num_gt": dict(result.num_gt),
    }


def save_result_json(result: EvalResult, path: str | Path) -> Path:
    """Write `result_to_dict(result)` as indented JSON (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result_to_dict(result), indent=2, allow_nan=False)
    return path
