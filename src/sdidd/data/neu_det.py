"""NEU-DET (steel surface defects): Pascal VOC XML boxes (parsed by `voc.py`), the project's n % 5 == 0 test split.

Layout: ``root/IMAGES/<class>_<n>.jpg`` and ``root/ANNOTATIONS/<class>_<n>.xml``. The class of a
box is its ``<name>``, never the file name (123 files hold boxes of another class).

VOC coordinates are 1-based inclusive pixel indices; they become 0-based half-open xyxy pixels as
``(xmin - 1, ymin - 1, xmax, ymax)``, so a box covering pixel columns 1..200 of a 200-px image
becomes ``0..200``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from sdidd.data.records import (
    MALFORMED_ANNOTATION,
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    DetectionDataset,
    Problems,
    Record,
)
from sdidd.data.voc import parse_voc_xml
from sdidd.errors import SdiddError

__all__ = ["NEU_CLASSES", "load_neu_det", "parse_voc_xml", "neu_split_of"]

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
NEU_SPLITS = ("train", "test", "all")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_STEM_RE = re.compile(r"^(.+)_(\d+)$")


def neu_split_of(stem: str) -> Optional[str]:
    """'test' when the trailing number n of `<class>_<n>` has n % 5 == 0, else 'train'; None if no n."""
    m = _STEM_RE.match(stem)
    if m is None:
        return None
    return "test" if int(m.group(2)) % 5 == 0 else "train"


def _list_stems(folder: Path, suffixes: set[str]) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()}


def load_neu_det(
    root: str | Path, split: str = "all", problems: Optional[Problems] = None
) -> DetectionDataset:
    """Load NEU-DET from `root` (holding IMAGES/ and ANNOTATIONS/); split is train, test or all."""
    if split not in NEU_SPLITS:
        raise SdiddError(f"NEU-DET: unknown split {split!r} (expected one of {', '.join(NEU_SPLITS)})")
    problems = problems if problems is not None else Problems(strict=True)
    root = Path(root).absolute()
    images_dir, ann_dir = root / "IMAGES", root / "ANNOTATIONS"
    if not images_dir.is_dir() or not ann_dir.is_dir():
        raise SdiddError(
            f"NEU-DET not found at {root}: expected {root}/IMAGES/*.jpg and {root}/ANNOTATIONS/*.xml; "
            "set SDIDD_DATA or data.root"
        )
    images = _list_stems(images_dir, _IMAGE_SUFFIXES)
    xmls = _list_stems(ann_dir, {".xml"})
    # ids come from the union of all stems so they do not depend on the split or on a missing file.
    stems = sorted(set(images) | set(xmls))

    records: list[Record] = []
    for idx, stem in enumerate(stems):
        if split != "all":
            s = neu_split_of(stem)
            if s is None:
                where = images.get(stem) or xmls[stem]
                problems.add(
                    MALFORMED_ANNOTATION,
                    f"{where}: file name does not end in _<number>, cannot assign a train/test split",
                )
                continue
            if s != split:
                continue
        if stem not in xmls:
            problems.add(MISSING_ANNOTATION, f"{images[stem]}: no annotation {ann_dir / (stem + '.xml')}")
            continue
        if stem not in images:
            problems.add(MISSING_IMAGE, f"{xmls[stem]}: image {images_dir / (stem + '.jpg')} is missing")
            continue
        parsed = parse_voc_xml(xmls[stem], NEU_CLASSES, problems)
        if parsed is None:
            continue
        width, height, boxes, labels = parsed
        records.append(Record(idx + 1, str(images[stem]), width, height, boxes, labels))
    return DetectionDataset(NEU_CLASSES, records, name=f"neu-det/{split}")
