"""Pascal VOC XML detection data with any class names (NEU-DET is one instance, see `neu_det.py`).

A split is one of
* a list file (``ImageSets/Main/train.txt``: one image id per line; a trailing `` 1``/`` -1`` column is
  ignored) whose ids name ``Annotations/<id>.xml`` and ``JPEGImages/<id>.<ext>`` of the VOC folder;
* a VOC folder holding ``Annotations/`` and ``JPEGImages/`` (all its images);
* a flat folder of ``<name>.<image ext>`` + ``<name>.xml`` pairs.

VOC coordinates are 1-based inclusive pixel indices; they become 0-based half-open xyxy pixels as
``(xmin - 1, ymin - 1, xmax, ymax)``, so a box covering pixel columns 1..200 of a 200-px image
becomes ``0..200``. Records are numbered ``image_id = index + 1`` in the sorted order of the image file
names. Classes are the description's `names` (another name is an error) or, without them, the sorted
names found in the split.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sdidd.data.records import (
    MALFORMED_ANNOTATION,
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    UNKNOWN_CLASS,
    DetectionDataset,
    Problems,
    Record,
    check_box,
)
from sdidd.errors import SdiddError

__all__ = ["IMAGE_SUFFIXES", "read_voc_xml", "parse_voc_xml", "load_voc", "voc_pairs"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _number(text: Optional[str]) -> float:
    """A finite float from an XML text field; ValueError otherwise (also for inf and NaN)."""
    v = float((text or "").strip())
    if not np.isfinite(v):
        raise ValueError(text)
    return v


def read_voc_xml(
    xml_path: Path, problems: Problems, classes: Optional[Sequence[str]] = None
) -> Optional[tuple[int, int, np.ndarray, list[str]]]:
    """Parse one VOC XML into (width, height, boxes xyxy [N,4], class names [N]); None if unusable.

    With `classes`, an object of another name is reported (UNKNOWN_CLASS) and skipped; without, any
    non-empty name is kept.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        problems.add(MALFORMED_ANNOTATION, f"{xml_path}: malformed XML ({e})")
        return None
    except OSError as e:
        problems.add(MALFORMED_ANNOTATION, f"{xml_path}: cannot read ({e.strerror or e})")
        return None
    except (ValueError, LookupError) as e:  # e.g. an unknown encoding declaration
        problems.add(MALFORMED_ANNOTATION, f"{xml_path}: malformed XML ({type(e).__name__}: {e})")
        return None
    try:
        width = int(_number(root.findtext("size/width", "")))
        height = int(_number(root.findtext("size/height", "")))
    except (ValueError, OverflowError):
        problems.add(MALFORMED_ANNOTATION, f"{xml_path}: missing or non-numeric <size><width>/<height>")
        return None
    if width <= 0 or height <= 0:
        problems.add(MALFORMED_ANNOTATION, f"{xml_path}: image size {width}x{height} is not positive")
        return None

    boxes: list[np.ndarray] = []
    names: list[str] = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if classes is None and not name:
            problems.add(MALFORMED_ANNOTATION, f"{xml_path}: object {k} has no <name>")
            continue
        if classes is not None and name not in classes:
            problems.add(
                UNKNOWN_CLASS,
                f"{xml_path}: object {k} has unknown class name {name!r} (valid: {', '.join(classes)})",
            )
            continue
        try:
            vals = [float(obj.findtext(f"bndbox/{t}", "")) for t in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            problems.add(MALFORMED_ANNOTATION, f"{xml_path}: object {k} ({name}) has no numeric <bndbox>")
            continue
        xmin, ymin, xmax, ymax = vals
        shown = f"box xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}"
        # 1-based inclusive -> 0-based half-open (see module docstring).
        box = check_box(
            (xmin - 1, ymin - 1, xmax, ymax), width, height, f"{xml_path}: object {k} ({name})",
            problems, shown=shown,
        )
        if box is not None:
            boxes.append(box)
            names.append(name)
    arr = np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return width, height, arr, names


def parse_voc_xml(
    xml_path: Path, classes: list[str], problems: Problems
) -> Optional[tuple[int, int, np.ndarray, np.ndarray]]:
    """Parse one VOC XML into (width, height, boxes xyxy [N,4], labels [N] = index in `classes`); None if unusable."""
    parsed = read_voc_xml(xml_path, problems, classes)
    if parsed is None:
        return None
    width, height, boxes, names = parsed
    return width, height, boxes, np.asarray([classes.index(n) for n in names], dtype=np.int64)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def _voc_root(list_file: Path, root: Optional[Path]) -> Path:
    """The VOC folder of a list file: `root` if it holds Annotations/, else the folder above ImageSets/."""
    for cand in ([root] if root is not None else []) + list(list_file.parents)[:3]:
        if (cand / "Annotations").is_dir():
            return cand
    raise SdiddError(f"{list_file}: no Annotations/ folder found for this image list (looked in "
                     f"{root or list_file.parent} and the folders above the list)")


def voc_pairs(split_path: str | Path, root: Optional[str | Path], problems: Problems) -> list[tuple[str, Optional[Path], Optional[Path]]]:
    """(name, image path, xml path) of every item of a split, sorted by name; a None side is missing."""
    p = Path(split_path).absolute()
    base = Path(root).absolute() if root is not None else None
    if p.is_file():
        vroot = _voc_root(p, base)
        ann_dir, img_dir = vroot / "Annotations", vroot / "JPEGImages"
        images = _images_by_stem(img_dir) if img_dir.is_dir() else {}
        try:
            lines = p.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SdiddError(f"{p}: cannot read the image list ({getattr(e, 'strerror', None) or e})") from None
        out: dict[str, tuple[str, Optional[Path], Optional[Path]]] = {}
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 2 and parts[1] == "-1":  # a per-class list: -1 = the class is absent
                continue
            stem = parts[0]
            if stem in out:
                problems.add(MALFORMED_ANNOTATION, f"{p}:{n}: image id {stem!r} is listed twice")
                continue
            xml = ann_dir / f"{stem}.xml"
            out[stem] = (stem, images.get(stem), xml if xml.is_file() else None)
            if out[stem][1] is None:
                problems.add(MISSING_IMAGE, f"{p}:{n}: image {img_dir / stem}.jpg (or .png ...) not found")
            if out[stem][2] is None:
                problems.add(MISSING_ANNOTATION, f"{p}:{n}: annotation {xml} not found")
        return sorted((v for v in out.values() if v[1] is not None and v[2] is not None), key=lambda v: v[1].name)
    if not p.is_dir():
        raise SdiddError(f"{p}: VOC split not found (a list file, a folder with Annotations/ and JPEGImages/, "
                         "or a folder of image + .xml pairs)")
    if (p / "Annotations").is_dir():
        img_dir, ann_dir = p / "JPEGImages", p / "Annotations"
        if not img_dir.is_dir():
            raise SdiddError(f"{p}: has Annotations/ but no JPEGImages/ folder")
    else:
        img_dir = ann_dir = p
    images = _images_by_stem(img_dir)
    xmls = {x.stem: x for x in sorted(ann_dir.iterdir()) if x.suffix.lower() == ".xml" and x.is_file()}
    if not images and not xmls:
        raise SdiddError(f"{p}: holds no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) and no .xml files")
    items = []
    for stem in sorted(set(images) | set(xmls)):
        if stem not in xmls:
            problems.add(MISSING_ANNOTATION, f"{images[stem]}: no annotation {ann_dir / (stem + '.xml')}")
        elif stem not in images:
            problems.add(MISSING_IMAGE, f"{xmls[stem]}: image {img_dir / stem}.jpg (or .png ...) is missing")
        else:
            items.append((stem, images[stem], xmls[stem]))
    return sorted(items, key=lambda v: v[1].name)


def load_voc(
    split_path: str | Path,
    root: Optional[str | Path] = None,
    names: Optional[Sequence[str]] = None,
    problems: Optional[Problems] = None,
) -> DetectionDataset:
    """Load one VOC split (list file, VOC folder or flat folder of pairs); classes = `names` or the sorted names found."""
    problems = problems if problems is not None else Problems(strict=True)
    classes = list(names) if names is not None else None
    parsed = []
    for k, (stem, image, xml) in enumerate(voc_pairs(split_path, root, problems)):
        got = read_voc_xml(xml, problems, classes)
        if got is not None:
            parsed.append((k + 1, image, got))  # ids by position in the sorted list: stable when an item is bad
    if classes is None:
        classes = sorted({n for _, _, (_, _, _, ns) in parsed for n in ns})
    records = [
        Record(k, str(image), w, h, boxes, np.asarray([classes.index(n) for n in ns], dtype=np.int64))
        for k, image, (w, h, boxes, ns) in parsed
    ]
    return DetectionDataset(classes, records, name=f"voc/{Path(split_path).name}")
