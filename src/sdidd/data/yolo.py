"""YOLO txt detection data: ``images/<split>/*.jpg`` + ``labels/<split>/*.txt``, class names from the description.

Each label line is ``class cx cy w h``: a class index into `names` and the box centre and size as
fractions of the image width / height. The label file of ``.../images/<split>/a/b.jpg`` is
``.../labels/<split>/a/b.txt`` (the last ``images`` folder of the path becomes ``labels``; a split
folder without one keeps its labels beside the images). As in ultralytics, an image with an empty or
missing label file is a background image (no defect; kept for training and testing), a segmentation
line ``class x1 y1 x2 y2 ...`` (a polygon) stands for its bounding box, and a box reaching a little past
the border (up to 2 % of the image side) is clipped to it, with a count in the log; a label file without
an image is reported. Records are numbered ``image_id = index + 1`` in the sorted order of the image
paths (relative to the split folder), and their boxes are xyxy pixels of the image, whose size is read
from its header.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from sdidd.data.records import (
    oriented_size,
    MALFORMED_ANNOTATION,
    MISSING_IMAGE,
    UNKNOWN_CLASS,
    UNREADABLE_IMAGE,
    DetectionDataset,
    Problems,
    Record,
    check_box,
)
from sdidd.data.voc import IMAGE_SUFFIXES
from sdidd.errors import SdiddError

__all__ = ["load_yolo", "labels_dir_of", "label_file_of", "parse_yolo_txt", "CLIP_FRACTION"]

log = logging.getLogger(__name__)
CLIP_FRACTION = 0.02  # of the image side: how far past the border a box may reach and still be clipped, not refused


def labels_dir_of(images_dir: Path) -> Path:
    """The label folder of an image folder: its last `images` path part replaced by `labels`, else itself."""
    parts = list(images_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return images_dir


def _image_size(path: Path, problems: Problems) -> Optional[tuple[int, int]]:
    """(width, height) from the image header (no decoding); None and a problem if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = oriented_size(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        problems.add(UNREADABLE_IMAGE, f"{path}: cannot read image ({type(e).__name__}: {e})")
        return None
    return int(w), int(h)


def parse_yolo_txt(txt: Path, width: int, height: int, num_classes: int, problems: Problems,
                   clipped: Optional[list[str]] = None) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(boxes xyxy pixels [N,4], labels [N]) of one label file; bad lines are reported and skipped; None if unreadable.

    The line of every box clipped by more than a pixel is appended to `clipped`.
    """
    try:
        text = txt.read_text()
    except (OSError, UnicodeDecodeError) as e:
        problems.add(MALFORMED_ANNOTATION, f"{txt}: cannot read ({getattr(e, 'strerror', None) or e})")
        return None
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{txt}:{n}"
        polygon = len(parts) >= 7 and len(parts) % 2 == 1  # class x1 y1 x2 y2 x3 y3 ...: a segmentation label
        if len(parts) != 5 and not polygon:
            problems.add(MALFORMED_ANNOTATION, f"{where}: expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 ...', "
                                               f"got {line.strip()[:80]!r}")
            continue
        try:
            cls = int(parts[0])
            values = [float(v) for v in parts[1:]]
        except ValueError:
            problems.add(MALFORMED_ANNOTATION, f"{where}: expected 'class cx cy w h', got {line.strip()[:80]!r}")
            continue
        if polygon:  # its bounding box
            xs, ys = values[0::2], values[1::2]
            values = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        cx, cy, bw, bh = values
        if not 0 <= cls < num_classes:
            problems.add(UNKNOWN_CLASS, f"{where}: class index {cls} is out of range (names has {num_classes}: 0..{num_classes - 1})")
            continue
        shown = f"box cx={cx:g} cy={cy:g} w={bw:g} h={bh:g}"
        with np.errstate(all="ignore"):  # inf/nan values: check_box reports them
            x1, y1, x2, y2 = ((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height)
        # ultralytics clips boxes to the image; a small overshoot is clipped here too (and counted), more is an error.
        box = check_box((x1, y1, x2, y2), width, height, where, problems, tol=max(1.0, CLIP_FRACTION * max(width, height)),
                        shown=shown)
        if box is not None:
            if clipped is not None and (x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1):
                clipped.append(where)
            boxes.append(box)
            labels.append(cls)
    arr = np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return arr, np.asarray(labels, dtype=np.int64)


def label_file_of(image: Path) -> Path:
    """The label file of a listed image: its path with the last `images` part replaced by `labels`, suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _listed_images(list_file: Path, problems: Problems) -> list[tuple[Path, Path]]:
    """(image, label file) of every line of an ultralytics .txt image list (relative lines: to the list's folder)."""
    try:
        lines = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SdiddError(f"{list_file}: cannot read the image list ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        image = (list_file.parent / line).resolve()
        if not image.is_file():
            problems.add(MISSING_IMAGE, f"{list_file}:{n}: listed image {image} not found")
            continue
        out.append((image, label_file_of(image)))
    return out


def _folder_images(images_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label file) of every image under `images_dir` (recursively), sorted by relative path."""
    if not images_dir.is_dir():
        raise SdiddError(f"{images_dir}: YOLO image folder not found")
    labels_dir = labels_dir_of(images_dir)
    images = sorted((p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: p.relative_to(images_dir).as_posix())
    if not images:
        raise SdiddError(f"{images_dir}: holds no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    return [(p, (labels_dir / p.relative_to(images_dir)).with_suffix(".txt")) for p in images]


def load_yolo(images_dir: str | Path | Sequence[str | Path], names: Sequence[str],
              problems: Optional[Problems] = None) -> DetectionDataset:
    """Load one YOLO split and its label files; classes = `names`.

    The split is an image folder (searched recursively), a .txt list of image paths, or a list of either.
    """
    problems = problems if problems is not None else Problems(strict=True)
    sources = [Path(images_dir)] if isinstance(images_dir, (str, Path)) else [Path(x) for x in images_dir]
    pairs: list[tuple[Path, Path]] = []
    for src in (s.absolute() for s in sources):
        listed = src.suffix.lower() == ".txt" and src.is_file()
        pairs += _listed_images(src, problems) if listed else _folder_images(src)
    if not pairs:
        raise SdiddError(f"{sources[0]}: lists no image")
    records: list[Record] = []
    seen: set[Path] = set()
    clipped: list[str] = []
    for k, (image, txt) in enumerate(pairs):
        seen.add(txt)
        size = _image_size(image, problems)
        if size is None:
            continue
        if not txt.is_file():  # a background image, as ultralytics reads it
            records.append(Record(k + 1, str(image), size[0], size[1]))
            continue
        parsed = parse_yolo_txt(txt, size[0], size[1], len(names), problems, clipped)
        if parsed is not None:
            records.append(Record(k + 1, str(image), size[0], size[1], parsed[0], parsed[1]))
    if clipped:
        log.warning(f"warning: {sources[0]}: {len(clipped)} box(es) reach past the image border and were clipped "
                    f"(e.g. {clipped[0]})")
    for src in sources:  # label files without an image (a folder split only: a list names its images itself)
        src = src.absolute()
        labels_dir = labels_dir_of(src)
        if src.is_dir() and labels_dir != src and labels_dir.is_dir():
            for txt in sorted(labels_dir.rglob("*.txt")):
                if txt not in seen and txt.name != "classes.txt":
                    problems.add(MISSING_IMAGE, f"{txt}: no image for this label file under {src}")
    return DetectionDataset(list(names), records, name=f"yolo/{sources[0].name}")
