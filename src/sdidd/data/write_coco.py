"""Write a detection dataset as COCO json + image files, with a dataset description beside it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from PIL import Image

from .records import DetectionDataset

__all__ = ["write_coco_split", "write_description"]


def write_coco_split(dataset: DetectionDataset, root: Path, split: str, classes: list[str],
                     image_ids: Optional[list[int]] = None) -> Path:
    """`root/annotations/<split>.json` and `root/images/<split>/*.png` for the boxes of `classes` (category ids 1..N).

    Images are named `<split>_<record image_id>.png` and get json ids 1..N in that (sorted) order.
    """
    out_images = root / "images" / split
    out_images.mkdir(parents=True, exist_ok=True)
    wanted = set(image_ids) if image_ids is not None else None
    lut = {dataset.classes.index(c): k + 1 for k, c in enumerate(classes)}
    images, anns = [], []
    for i, r in enumerate(dataset.records):
        if wanted is not None and r.image_id not in wanted:
            continue
        name = f"{split}_{r.image_id:06d}.png"
        Image.fromarray(dataset.load_image(i).permute(1, 2, 0).numpy()).save(out_images / name)
        image_id = len(images) + 1  # numbered in file-name order, as the VOC and YOLO loaders number theirs
        images.append({"id": image_id, "file_name": name, "width": int(r.width), "height": int(r.height)})
        for (x1, y1, x2, y2), lab in zip(np.asarray(r.boxes).tolist(), np.asarray(r.labels).tolist()):
            if lab in lut:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": lut[lab],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    ann = root / "annotations" / f"{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}))
    return ann


def write_description(root: Path, classes: list[str], train: bool = True, test: bool = True) -> Path:
    """`root/data.yaml` describing the splits written by :func:`write_coco_split`."""
    desc: dict = {"format": "coco", "path": "."}
    if train:
        desc.update({"train": "annotations/train.json", "train_images": "images/train"})
    if test:
        desc.update({"test": "annotations/test.json", "test_images": "images/test"})
    desc["names"] = list(classes)
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(desc, sort_keys=False))
    return path
