"""Annotation records, the generic detection dataset, and the problem sink shared by loaders and checker.

Every loader parses its annotation format into :class:`Record` objects (no pixels). Parsing goes
through a :class:`Problems` sink: in strict mode (what the loaders use for training) the first
problem raises :class:`~sdidd.errors.SdiddError`; in collecting mode (what ``check.py`` uses) the
problem is counted, the bad item skipped, and parsing goes on. So the parsing code exists once.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from sdidd.errors import SdiddError

__all__ = [
    "Record",
    "DetectionDataset",
    "Problems",
    "read_image",
    "rgb8",
    "oriented_size",
    "check_box",
    "Transform",
    "UNREADABLE_IMAGE",
    "MALFORMED_ANNOTATION",
    "BAD_BOX",
    "UNKNOWN_CLASS",
    "MISSING_IMAGE",
    "MISSING_ANNOTATION",
    "SIZE_MISMATCH",
    "DUPLICATE_IMAGE",
    "PROBLEM_KINDS",
    "WARNING_KINDS",
]

# Problem kinds (keys of CheckReport.counts). Duplicates are only a warning: NEU-DET ships a real one.
UNREADABLE_IMAGE = "unreadable_image"
MALFORMED_ANNOTATION = "malformed_annotation"
BAD_BOX = "bad_box"
UNKNOWN_CLASS = "unknown_class"
MISSING_IMAGE = "missing_image"
MISSING_ANNOTATION = "missing_annotation"
SIZE_MISMATCH = "size_mismatch"
DUPLICATE_IMAGE = "duplicate_image"
PROBLEM_KINDS = (
    UNREADABLE_IMAGE,
    MALFORMED_ANNOTATION,
    BAD_BOX,
    UNKNOWN_CLASS,
    MISSING_IMAGE,
    MISSING_ANNOTATION,
    SIZE_MISMATCH,
    DUPLICATE_IMAGE,
)
WARNING_KINDS = frozenset({DUPLICATE_IMAGE})

Transform = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict]"]


@dataclass
class Record:
    """One image's annotation, loaded without the pixels."""

    image_id: int  # stable: a COCO json's own image id, else the index in the sorted file list + 1
    file: str  # absolute image path (or a pseudo path for generated data)
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [N,4] xyxy
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # [N] global

    def __post_init__(self) -> None:
        # Normalise dtypes/shapes once so every consumer can rely on them.
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.file}: {len(self.boxes)} boxes but {len(self.labels)} labels")


class Problems:
    """Sink for data problems: raises SdiddError on the first one (strict) or collects them."""

    def __init__(self, strict: bool = True, max_examples: int = 5, hint: str = "") -> None:
        self.strict = strict
        self.max_examples = max_examples
        self.hint = hint  # appended to the strict error, e.g. how training can skip the item instead
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, message: str) -> None:
        """Report one problem of `kind`; `message` starts with the file it concerns."""
        if self.strict:
            raise SdiddError(f"{message}{self.hint}")
        self.counts[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(" ".join(message.splitlines()))


def _fmt_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def check_box(
    box: Sequence[float],
    width: int,
    height: int,
    where: str,
    problems: Problems,
    tol: float = 1.0,
    shown: Optional[str] = None,
) -> Optional[np.ndarray]:
    """Validate one xyxy box against its image; returns it clipped to the image, or None if bad.

    `shown` is how the box is written in the messages (e.g. the raw VOC values the user can grep
    for); by default the xyxy values.
    """
    b = np.asarray(box, dtype=np.float64)
    text = shown if shown is not None else f"box {_fmt_box(box)}"
    if not np.all(np.isfinite(b)):
        problems.add(BAD_BOX, f"{where}: {text} has non-finite coordinates")
        return None
    x1, y1, x2, y2 = b
    if x2 <= x1 or y2 <= y1:
        problems.add(BAD_BOX, f"{where}: {text} has non-positive size")
        return None
    # Annotators often overshoot the border by a pixel: tolerate and clip that, reject more.
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        problems.add(BAD_BOX, f"{where}: {text} is outside the {width}x{height} image")
        return None
    c = np.array([max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)], dtype=np.float32)
    if c[2] <= c[0] or c[3] <= c[1]:
        problems.add(BAD_BOX, f"{where}: {text} is empty once clipped to the image")
        return None
    return c


_QUARTER_TURNS = {5, 6, 7, 8}  # EXIF orientations that show the image turned by 90 degrees
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is displayed (EXIF orientation applied), from the header alone."""
    w, h = im.size
    try:
        turned = im.getexif().get(0x0112) in _QUARTER_TURNS
    except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels as stored
        turned = False
    return (h, w) if turned else (w, h)


def rgb8(im: Image.Image) -> np.ndarray:
    """Every pixel decoded as displayed: EXIF orientation applied, 16-bit and float images scaled to 8 bits, [H, W, 3] RGB.

    16-bit images (industrial cameras) map their full range 0-65535 onto 0-255, as OpenCV's 8-bit read does;
    float images are taken as 0-1 when no value exceeds 1, else as 0-255. convert() alone would clip them.
    """
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels as stored
        pass
    if im.mode in _WIDE_MODES or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        full = _WIDE_MODES.get(im.mode) or (1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0)
        gray = np.clip(np.nan_to_num(a) * (255.0 / full), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a uint8 [3,H,W] RGB tensor, as displayed (see :func:`rgb8`); SdiddError if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            # Decoding every pixel here makes a truncated file fail now, not later in training.
            arr = rgb8(im)
    except FileNotFoundError:
        raise SdiddError(f"{path}: cannot read image (file not found)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SdiddError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class DetectionDataset(torch.utils.data.Dataset):
    """Images + xyxy boxes with global labels; yields (uint8 [3,H,W], target dict)."""

    def __init__(
        self,
        classes: Sequence[str],
        records: Sequence[Record],
        transform: Optional[Transform] = None,
        name: str = "",
    ) -> None:
        # The name of each label value: records' labels index this list, always. As loaded it is the dataset's class
        # order; a `channel_view` (engine/run_data.py) relabels the boxes to model channels and sets it to them.
        self.classes: list[str] = list(classes)
        self.records: list[Record] = list(records)
        self.transform = transform
        self.name = name
        # Decoded uint8 pixels by image_id, filled once per run when the split fits the memory budget
        # (see engine/run_data.py); loader workers forked after that share the tensors without copying.
        self.pixels: dict[int, torch.Tensor] = {}
        # Class name -> the annotation file's own category id (COCO json), for results files other tools read.
        self.category_ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def in_memory(self) -> bool:
        """True when pixels come from memory (decoded cache or generated data), not from files."""
        return bool(self.pixels)

    def load_image(self, i: int) -> torch.Tensor:
        """Pixels of record `i` as uint8 [3,H,W] (from the in-memory cache when filled); synthetic data overrides this."""
        cached = self.pixels.get(self.records[i].image_id)
        return cached if cached is not None else read_image(self.records[i].file)

    def get_target(self, i: int) -> dict:
        """Untransformed target of record `i`: boxes float32 [N,4], labels int64 [N], image_id."""
        r = self.records[i]
        return {
            "boxes": torch.from_numpy(r.boxes.copy()).float().reshape(-1, 4),
            "labels": torch.from_numpy(r.labels.copy()).long().reshape(-1),
            "image_id": int(r.image_id),
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        """Image and target of record `i`, passed through the transform if one is set."""
        image = self.load_image(i)
        target = self.get_target(i)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def with_records(self, records: Sequence[Record]) -> "DetectionDataset":
        """Shallow copy (same class, classes and transform) holding other records."""
        out = copy.copy(self)
        out.records = list(records)
        return out

    @property
    def num_boxes(self) -> int:
        """Total number of boxes over all records."""
        return int(sum(len(r.labels) for r in self.records))

    def class_counts(self) -> dict[str, int]:
        """Number of boxes per class name, in class order."""
        counts = np.zeros(len(self.classes), dtype=np.int64)
        for r in self.records:
            if len(r.labels):
                counts += np.bincount(r.labels, minlength=len(self.classes))[: len(self.classes)]
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def summary(self) -> str:
        """Human-readable counts: images, boxes, boxes per class."""
        name = f"{self.name}: " if self.name else ""
        lines = [f"{name}{len(self)} images, {self.num_boxes} boxes"]
        width = max((len(c) for c in self.classes), default=0)
        for i, (c, n) in enumerate(self.class_counts().items()):
            lines.append(f"  {i:2d} {c:<{width}} {n}")
        return "\n".join(lines)
