"""Generic COCO-json detection data (bbox xywh -> xyxy).

Categories are sorted by id and remapped to labels 0..C-1 in that order; a category name must be a
non-empty string, and ids and names must be unique. Images are sorted by file name and keep the json's
own ``id`` as ``image_id`` (so eval and predict results name the user's images). Images without
annotations are kept with no boxes; ``iscrowd`` annotations are skipped. Every field is checked for
its type: a wrong one is a one-line problem naming the file and the entry, never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
from sdidd.errors import SdiddError, shown

log = logging.getLogger(__name__)

__all__ = ["load_coco_json"]


def _fail(problems: Problems, msg: str) -> DetectionDataset:
    problems.add(MALFORMED_ANNOTATION, msg)
    return DetectionDataset([], [], name="coco")


def _int(v: Any) -> int:
    """An integer field (an int, an integral float or a numeric string); ValueError otherwise."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise ValueError(v)
        return int(v)
    if isinstance(v, (int, str)):
        return int(v)
    raise ValueError(v)


def _num(v: Any) -> float:
    """A number field (int or float, NaN/inf allowed: the box check reports them); ValueError otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(v)
    return float(v)


def _categories(cats: Any, ann_file: Path) -> tuple[list[str], dict[int, int]]:
    """(class names in id order, category id -> label); SdiddError naming the bad entry."""
    if not isinstance(cats, list) or not cats:
        raise SdiddError(f"{ann_file}: no 'categories' list")
    parsed: dict[int, str] = {}
    for k, c in enumerate(cats):
        if not isinstance(c, dict):
            raise SdiddError(f"{ann_file}: categories[{k}] is not a mapping with 'id' and 'name'")
        try:
            cid = _int(c.get("id"))
        except ValueError:
            raise SdiddError(f"{ann_file}: categories[{k}] lacks an integer 'id' (got {c.get('id')!r})") from None
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SdiddError(f"{ann_file}: categories[{k}] 'name' must be a non-empty string, got {name!r}")
        if cid in parsed:
            raise SdiddError(f"{ann_file}: categories[{k}] repeats category id {cid}")
        if name.strip() in parsed.values():
            raise SdiddError(f"{ann_file}: categories[{k}] repeats class name {name.strip()!r}")
        parsed[cid] = name.strip()
    ids = sorted(parsed)
    return [parsed[i] for i in ids], {i: k for k, i in enumerate(ids)}


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return _fail(problems, f"{ann_file}: malformed json ({type(e).__name__}: {e})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return _fail(problems, f"{ann_file}: not a COCO detection file (no 'images' list)")
    if "annotations" not in data:
        return _fail(problems, f"{ann_file}: no 'annotations' key (a COCO detection file needs one, [] if no image has a box)")
    if not isinstance(data["annotations"], list):
        return _fail(problems, f"{ann_file}: 'annotations' must be a list, got {type(data['annotations']).__name__}")
    try:
        classes, cat_to_label = _categories(data.get("categories"), ann_file)
    except SdiddError as e:
        return _fail(problems, str(e))

    images: dict[int, dict] = {}
    files: set[str] = set()
    for k, im in enumerate(data["images"]):
        try:
            if not isinstance(im, dict):
                raise ValueError(im)
            iid, w, h = _int(im.get("id")), _int(im.get("width")), _int(im.get("height"))
            fname = im.get("file_name")
            if not isinstance(fname, str) or not fname.strip():
                raise ValueError(fname)
        except (ValueError, OverflowError):
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: images[{k}] lacks an integer id/width/height or a file_name")
            continue
        if w <= 0 or h <= 0:
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: images[{k}] ({fname}) has size {w}x{h}")
            continue
        if iid in images:
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: images[{k}] ({fname}) repeats image id {iid}")
            continue
        if fname in files:
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: images[{k}] lists file {fname} a second time")
            continue
        files.add(fname)
        images[iid] = {"id": iid, "file": fname, "width": w, "height": h, "boxes": [], "labels": []}

    for k, a in enumerate(data["annotations"]):
        try:
            if not isinstance(a, dict) or not isinstance(a.get("bbox"), (list, tuple)):
                raise ValueError(a)
            iid, cid = _int(a.get("image_id")), _int(a.get("category_id"))
            x, y, bw, bh = (_num(v) for v in a["bbox"])
        except (ValueError, OverflowError):
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: annotations[{k}] lacks an integer image_id/category_id or a bbox of 4 numbers")
            continue
        if a.get("iscrowd", 0) not in (0, 1, False, True, None):
            problems.add(MALFORMED_ANNOTATION, f"{ann_file}: annotations[{k}] has iscrowd {a.get('iscrowd')!r} (0 or 1)")
            continue
        if a.get("iscrowd"):
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
    outside: list[str] = []
    for im in sorted(images.values(), key=lambda d: d["file"]):
        path = images_dir / im["file"]
        if not os.path.normpath(path).startswith(os.path.normpath(images_dir) + os.sep):
            outside.append(im["file"])  # '../' or an absolute path: read, but the user is told
        try:
            found = path.is_file()
        except (OSError, ValueError):  # a file name the system cannot look up (NUL byte, too long)
            found = False
        if not found:
            problems.add(MISSING_IMAGE, f"{ann_file}: image {path} not found")
            continue
        boxes = np.stack(im["boxes"]) if im["boxes"] else np.zeros((0, 4), np.float32)
        records.append(Record(im["id"], str(path), im["width"], im["height"], boxes, im["labels"]))
    if outside:
        log.warning(f"warning: {ann_file}: {len(outside)} image file_name(s) point outside the images folder {images_dir} "
                    f"(e.g. {shown(outside[0])}); they are read from there")
    ds = DetectionDataset(classes, records, name=f"coco/{ann_file.stem}")
    ds.category_ids = {c: i for c, i in zip(classes, sorted(cat_to_label))}  # the json's own ids, for results files
    return ds
