"""What the COCO, VOC and YOLO writers share: which images a split writes, their names, and the data.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import yaml
from PIL import Image

from .records import DetectionDataset, Record


def write_images(dataset: DetectionDataset, folder: Path, split: str,
                 image_ids: Optional[list[int]] = None) -> Iterator[tuple[str, Record]]:
    """Save each wanted record's image as `folder/<split>_<image_id>.png`; yield (file stem, record) in record order."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(image_ids) if image_ids is not None else None
    for i, r in enumerate(dataset.records):
        if wanted is not None and r.image_id not in wanted:
            continue
        stem = f"{split}_{r.image_id:06d}"
        Image.fromarray(dataset.load_image(i).permute(1, 2, 0).numpy()).save(folder / f"{stem}.png")
        yield stem, r


def boxes_of(r: Record, lut: dict[int, object]) -> list[tuple[object, list[float]]]:
    """(lut[label], [x1, y1, x2, y2]) for each box of `r` whose label is in `lut`."""
    return [(lut[lab], box) for box, lab in zip(np.asarray(r.boxes).tolist(), np.asarray(r.labels).tolist()) if lab in lut]


def save_description(root: Path, fmt: str, classes: list[str], train: Optional[dict[str, str]],
                     test: Optional[dict[str, str]]) -> Path:
    """`root/data.yaml`: format, path, the train / test entries given (None: no such split), names."""
    desc: dict = {"format": fmt, "path": ".", **(train or {}), **(test or {}), "names": list(classes)}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(desc, sort_keys=False))
    return path
