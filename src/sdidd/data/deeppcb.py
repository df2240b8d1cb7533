"""DeepPCB (printed circuit board defects): the official trainval/test split files.

A split-file line is ``groupG/G/<id>.jpg groupG/G_not/<id>.txt`` (paths relative to PCBData/);
the defective image really lives at ``groupG/G/<id>_test.jpg``. An annotation line is
``x1 y1 x2 y2 type`` (space separated; commas, as the original README says, are accepted too),
with type 1..6 -> labels 0..5. Coordinates are taken as xyxy pixels as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from sdidd.data.records import (
    oriented_size,
    MALFORMED_ANNOTATION,
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    UNKNOWN_CLASS,
    UNREADABLE_IMAGE,
    DetectionDataset,
    Problems,
    Record,
    check_box,
)
from sdidd.errors import SdiddError

__all__ = ["DEEPPCB_CLASSES", "load_deeppcb", "parse_deeppcb_txt", "read_split_file", "find_pcbdata"]

DEEPPCB_CLASSES = ["open", "short", "mousebite", "spur", "copper", "pin-hole"]
DEEPPCB_SPLITS = ("trainval", "test", "all")
_SEP = re.compile(r"[,\s]+")
_TYPES_HELP = ", ".join(f"{i + 1} {c}" for i, c in enumerate(DEEPPCB_CLASSES))


def find_pcbdata(root: str | Path) -> Optional[Path]:
    """The PCBData folder under `root` (or `root` itself when it is PCBData); None if absent."""
    root = Path(root)
    for cand in (root / "PCBData", root):
        if (cand / "trainval.txt").is_file() or (cand / "test.txt").is_file():
            return cand
    return None


def read_split_file(path: Path, problems: Problems) -> list[tuple[str, str, int]]:
    """Entries (image rel path, annotation rel path, line number) of a split file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        problems.add(MALFORMED_ANNOTATION, f"{path}: cannot read split file ({e})")
        return []
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            problems.add(
                MALFORMED_ANNOTATION,
                f"{path}:{lineno}: expected '<image>.jpg <annotation>.txt', got {line.strip()!r}",
            )
            continue
        out.append((parts[0], parts[1], lineno))
    return out


def parse_deeppcb_txt(
    txt_path: Path, width: int, height: int, problems: Problems
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Parse one DeepPCB annotation file into (boxes xyxy [N,4], labels [N]); None if unreadable."""
    try:
        text = txt_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        problems.add(MALFORMED_ANNOTATION, f"{txt_path}: cannot read ({e})")
        return None
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        parts = _SEP.split(s)
        try:
            if len(parts) != 5:
                raise ValueError
            coords = [float(v) for v in parts[:4]]
            t = int(parts[4])
        except ValueError:
            problems.add(
                MALFORMED_ANNOTATION, f"{txt_path}:{lineno}: expected 'x1 y1 x2 y2 type', got {s!r}"
            )
            continue
        if not 1 <= t <= len(DEEPPCB_CLASSES):
            problems.add(UNKNOWN_CLASS, f"{txt_path}:{lineno}: unknown defect type {t} (expected {_TYPES_HELP})")
            continue
        box = check_box(coords, width, height, f"{txt_path}:{lineno}", problems)
        if box is not None:
            boxes.append(box)
            labels.append(t - 1)
    arr = np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return arr, np.asarray(labels, dtype=np.int64)


def _image_path(pcb: Path, rel: str) -> Path:
    """Map a split-file image entry to the defective image (<id>_test.jpg)."""
    p = pcb / rel
    if p.stem.endswith("_test"):
        return p
    return p.with_name(f"{p.stem}_test{p.suffix}")


def load_deeppcb(
    root: str | Path, split: str = "trainval", problems: Optional[Problems] = None
) -> DetectionDataset:
    """Load DeepPCB from `root` (the folder holding PCBData/); split is trainval, test or all."""
    if split not in DEEPPCB_SPLITS:
        raise SdiddError(f"DeepPCB: unknown split {split!r} (expected one of {', '.join(DEEPPCB_SPLITS)})")
    problems = problems if problems is not None else Problems(strict=True)
    root = Path(root).absolute()
    pcb = find_pcbdata(root)
    if pcb is None:
        raise SdiddError(
            f"DeepPCB not found at {root}: expected {root}/PCBData/trainval.txt and "
            f"{root}/PCBData/test.txt; set SDIDD_DATA or data.root"
        )

    # Read both split files: image ids index the sorted union, so they are the same in any split.
    entries: dict[str, list[tuple[str, str, int, Path]]] = {}
    for name in ("trainval", "test"):
        f = pcb / f"{name}.txt"
        if not f.is_file():
            if split in (name, "all"):
                problems.add(MISSING_ANNOTATION, f"{f}: split file not found")
            entries[name] = []
            continue
        entries[name] = [(img, ann, ln, f) for img, ann, ln in read_split_file(f, problems)]
    all_images = sorted({img for lst in entries.values() for img, _, _, _ in lst})
    ids = {img: i + 1 for i, img in enumerate(all_images)}

    wanted = ("trainval", "test") if split == "all" else (split,)
    records: list[Record] = []
    seen: set[str] = set()
    for name in wanted:
        for img_rel, ann_rel, lineno, split_file in entries[name]:
            if img_rel in seen:  # listed twice: keep the first, a record must be unique
                continue
            seen.add(img_rel)
            img = _image_path(pcb, img_rel)
            if not img.is_file():
                problems.add(MISSING_IMAGE, f"{split_file}:{lineno}: listed image {img} not found")
                continue
            ann = pcb / ann_rel
            if not ann.is_file():
                problems.add(MISSING_ANNOTATION, f"{split_file}:{lineno}: annotation {ann} not found")
                continue
            try:
                # Image.open only reads the header here; pixels are decoded in __getitem__.
                with Image.open(img) as im:
                    width, height = oriented_size(im)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                problems.add(UNREADABLE_IMAGE, f"{img}: cannot read image ({type(e).__name__}: {e})")
                continue
            parsed = parse_deeppcb_txt(ann, width, height, problems)
            if parsed is None:
                continue
            boxes, labels = parsed
            records.append(Record(ids[img_rel], str(img), width, height, boxes, labels))
    records.sort(key=lambda r: r.image_id)  # same order as the ids, whatever the split file's order
    return DetectionDataset(DEEPPCB_CLASSES, records, name=f"deeppcb/{split}")
