"""Generic COCO-json detection data (bbox xywh -> xyxy).

Categories are sorted by id and remapped to labels 0..C-1 in that order. Images are sorted by
file name and get ``image_id = index + 1`` (the project-wide convention), not the json's ids.
Images without annotations are kept with no boxes; ``iscrowd`` annotations are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sdidd.data.records import (
    MALFORMED_ANNOTATION,
    MISSING_IMAGE,
    UNKNOWN_CLASS,
    DetectionDataset,
    Problems,
    Record,
    check_box,
)
from sdidd.errors import SdiddError

__all__ = ["load_coco_json"]


def _fail(problems: Problems, msg: str) -> DetectionDataset:
    problems.add(MALFORMED_ANNOTATION, msg)
    return DetectionDataset([], [], name="coco")


def load_coco_json(
    images_dir: str | Path, ann_file: str | Path, problems: Optional[Problems] = None
) -> DetectionDataset:
    """Load a COCO-format detection json whose file names are relative to `images_dir`."""
    problems = problems if problems is not None else Problems(strict=True)
    images_dir, ann_file = Path(images_dir).absolute(), Path(ann_file).absolute()
    if not ann_file.is_file():
        raise SdiddError(f"{ann_file}: COCO annotation file not found")
    try:
        data: Any = json.loads(ann_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return _fail(problems, f"{ann_file}: malformed json ({e})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return _fail(problems, f"{ann_file}: not a COCO detection file (no 'images' list)")
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        return _fail(problems, f"{ann_file}: no 'categories' list")
    try:
        cats = sorted(cats, key=lambda c: int(c["id"]))
        classes = [str(c["name"]) for c in cats]
        cat_to_label = {int(c["id"]): i for i, c in enumerate(cats)}
    except (KeyError, TypeError, ValueError):
        return _fail(problems, f"{ann_file}: a category lacks an integer 'id' or a 'name'")

    images: dict[int, dict] = {}
    for k, im in enumerate(data["images"]):
        try:
            iid, fname = int(im["id"]), str(im["file_name"])
            w, h = int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: images[{k}] lacks id/file_name/width/height")
            continue
        if w <= 0 or h <= 0:
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: images[{k}] ({fname}) has size {w}x{h}")
            continue
        images[iid] = {"file": fname, "width": w, "height": h, "boxes": [], "labels": []}

    for k, a in enumerate(data.get("annotations") or []):
        try:
            iid, cid = int(a["image_id"]), int(a["category_id"])
            x, y, bw, bh = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: annotations[{k}] lacks image_id/category_id/bbox")
            continue
        if a.get("iscrowd", 0):
            continue
        if iid not in images:
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: annotations[{k}] refers to unknown image id {iid}")
            continue
        im = images[iid]
        if cid not in cat_to_label:
            problems.add(UNKNOWN_CLASS, f"{ann_file}: annotations[{k}] ({im['file']}) has unknown category id {cid}")
            continue
        box = check_box(
            (x, y, x + bw, y + bh), im["width"], im["height"], f"{ann_file}: annotations[{k}] ({im['file']})",
            problems, shown=f"bbox [{x:g}, {y:g}, {bw:g}, {bh:g}]",
        )
        if box is not None:
            im["boxes"].append(box)
            im["labels"].append(cat_to_label[cid])

    records: list[Record] = []
    for idx, im in enumerate(sorted(images.values(), key=lambda d: d["file"])):
        path = images_dir / im["file"]
        if not path.is_file():
            problems.add(MISSING_IMAGE, f"{ann_file}: image {path} not found")
            continue
        boxes = np.stack(im["boxes"]) if im["boxes"] else np.zeros((0, 4), np.float32)
        records.append(Record(idx + 1, str(path), im["width"], im["height"], boxes, im["labels"]))
    return DetectionDataset(classes, records, name=f"coco/{ann_file.stem}")
