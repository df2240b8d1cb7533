"""Write a detection dataset as YOLO txt (images/<split>/, labels/<split>/) with a dataset description."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .records import DetectionDataset
from .write_common import boxes_of, save_description, write_images

__all__ = ["write_yolo_split", "write_yolo_description"]


def write_yolo_split(dataset: DetectionDataset, root: Path, split: str, classes: list[str],
                     image_ids: Optional[list[int]] = None) -> Path:
    """`root/images/<split>/<split>_<id>.png` and `root/labels/<split>/<same>.txt` (`class cx cy w h`, fractions)."""
    images, labels = root / "images" / split, root / "labels" / split
    labels.mkdir(parents=True, exist_ok=True)
    lut = {dataset.classes.index(c): k for k, c in enumerate(classes)}
    for stem, r in write_images(dataset, images, split, image_ids):
        w, h = float(r.width), float(r.height)
        lines = [f"{k} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
                 for k, (x1, y1, x2, y2) in boxes_of(r, lut)]
        (labels / f"{stem}.txt").write_text("".join(lines))  # empty for an image without a box: it is a negative
    return images


def write_yolo_description(root: Path, classes: list[str], train: bool = True, test: bool = True) -> Path:
    """`root/data.yaml` describing the splits written by :func:`write_yolo_split`."""
    return save_description(root, "yolo", classes, {"train": "images/train"} if train else None,
                            {"test": "images/test"} if test else None)
