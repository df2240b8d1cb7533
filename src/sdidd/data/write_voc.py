"""Write a detection dataset as Pascal VOC (JPEGImages/, Annotations/, ImageSets/Main/) with a dataset description."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

from .records import DetectionDataset
from .write_common import boxes_of, save_description, write_images

__all__ = ["write_voc_split", "write_voc_description"]


def _xml(name: str, width: int, height: int, objects: list[tuple[str, list[float]]]) -> bytes:
    """One VOC annotation; boxes are written 1-based inclusive (xmin = x1 + 1, xmax = x2), as whole pixels."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = name
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    for cls, (x1, y1, x2, y2) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = cls
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(int(round(v)))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def write_voc_split(dataset: DetectionDataset, root: Path, split: str, classes: list[str],
                    image_ids: Optional[list[int]] = None) -> Path:
    """`root/JPEGImages/<split>_<id>.png`, `root/Annotations/<same>.xml` for the boxes of `classes`, and the split's list file."""
    anns, sets = root / "Annotations", root / "ImageSets" / "Main"
    for d in (anns, sets):
        d.mkdir(parents=True, exist_ok=True)
    keep = {dataset.classes.index(c): c for c in classes}
    stems = []
    for stem, r in write_images(dataset, root / "JPEGImages", split, image_ids):
        (anns / f"{stem}.xml").write_bytes(_xml(f"{stem}.png", int(r.width), int(r.height), boxes_of(r, keep)))
        stems.append(stem)
    listed = sets / f"{split}.txt"
    listed.write_text("".join(f"{s}\n" for s in stems))
    return listed


def write_voc_description(root: Path, classes: list[str], train: bool = True, test: bool = True) -> Path:
    """`root/data.yaml` describing the splits written by :func:`write_voc_split`."""
    return save_description(root, "voc", classes, {"train": "ImageSets/Main/train.txt"} if train else None,
                            {"test": "ImageSets/Main/test.txt"} if test else None)
