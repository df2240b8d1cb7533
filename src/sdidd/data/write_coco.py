"""Write a detection dataset as COCO json + image files, with a dataset description beside it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .records import DetectionDataset
from .write_common import boxes_of, save_description, write_images

__all__ = ["write_coco_split", "write_description"]


def write_coco_split(dataset: DetectionDataset, root: Path, split: str, classes: list[str],
                     image_ids: Optional[list[int]] = None) -> Path:
    """`root/annotations/<split>.json` and `root/images/<split>/*.png` for the boxes of `classes` (category ids 1..N).

    Images are named `<split>_<record image_id>.png` and get json ids 1..N in that (sorted) order.
    """
    lut = {dataset.classes.index(c): k + 1 for k, c in enumerate(classes)}
    images, anns = [], []
    for stem, r in write_images(dataset, root / "images" / split, split, image_ids):
        image_id = len(images) + 1  # numbered in file-name order, as the VOC and YOLO loaders number theirs
        images.append({"id": image_id, "file_name": f"{stem}.png", "width": int(r.width), "height": int(r.height)})
        for cid, (x1, y1, x2, y2) in boxes_of(r, lut):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    ann = root / "annotations" / f"{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}))
    return ann


def write_description(root: Path, classes: list[str], train: bool = True, test: bool = True) -> Path:
    """`root/data.yaml` describing the splits written by :func:`write_coco_split`."""
    return save_description(root, "coco", classes,
                            {"train": "annotations/train.json", "train_images": "images/train"} if train else None,
                            {"test": "annotations/test.json", "test_images": "images/test"} if test else None)
