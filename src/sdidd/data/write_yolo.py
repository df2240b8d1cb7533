"""Write a detection dataset as YOLO txt (images/<split>/, labels/<split>/) with a dataset description."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from PIL import Image

from .records import DetectionDataset

__all__ = ["write_yolo_split", "write_yolo_description"]


def write_yolo_split(dataset: DetectionDataset, root: Path, split: str, classes: list[str],
                     image_ids: Optional[list[int]] = None) -> Path:
    """`root/images/<split>/<split>_<id>.png` and `root/labels/<split>/<same>.txt` (`class cx cy w h`, fractions)."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    wanted = set(image_ids) if image_ids is not None else None
    lut = {dataset.classes.index(c): k for k, c in enumerate(classes)}
    for i, r in enumerate(dataset.records):
        if wanted is not None and r.image_id not in wanted:
            continue
        stem = f"{split}_{r.image_id:06d}"
        Image.fromarray(dataset.load_image(i).permute(1, 2, 0).numpy()).save(images / f"{stem}.png")
        w, h = float(r.width), float(r.height)
        lines = [f"{lut[lab]} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
                 for (x1, y1, x2, y2), lab in zip(np.asarray(r.boxes).tolist(), np.asarray(r.labels).tolist()) if lab in lut]
        (labels / f"{stem}.txt").write_text("".join(lines))  # empty for an image without a box: it is a negative
    return images


def write_yolo_description(root: Path, classes: list[str], train: bool = True, test: bool = True) -> Path:
    """`root/data.yaml` describing the splits written by :func:`write_yolo_split`."""
    desc: dict = {"format": "yolo", "path": "."}
    if train:
        desc["train"] = "images/train"
    if test:
        desc["test"] = "images/test"
    desc["names"] = list(classes)
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(desc, sort_keys=False))
    return path
