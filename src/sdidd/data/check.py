"""Validate a dataset before a long run, reporting every problem instead of stopping at the first.

The annotation side reuses the loaders' parsers with a collecting :class:`Problems` sink; this
module adds what the loaders skip for speed: full decoding of every image, image size against the
annotation, and byte-identical duplicates (a warning only: NEU-DET ships one real pair).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from sdidd.data import canonical_name, resolve_data_root
from sdidd.data.coco_json import load_coco_json
from sdidd.data.deeppcb import find_pcbdata, load_deeppcb
from sdidd.data.neu_det import load_neu_det
from sdidd.data.records import (
    oriented_size,
    rgb8,
    DUPLICATE_IMAGE,
    PROBLEM_KINDS,
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    WARNING_KINDS,
    DetectionDataset,
    Problems,
    check_box,
)
from sdidd.data.description import load_description
from sdidd.data.formats import described_splits, load_described_split
from sdidd.data.synthetic import load_synthetic
from sdidd.data.voc import load_voc
from sdidd.errors import SdiddError

__all__ = ["CheckReport", "check_dataset", "check_images"]


@dataclass
class CheckReport:
    """Counts and first examples of each problem kind found in one dataset."""

    dataset: str
    root: str
    split: str
    num_images: int = 0
    num_boxes: int = 0
    num_background: int = 0  # images without any box: no defect (kept for training and testing)
    class_counts: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def errors(self) -> dict[str, int]:
        """Problem kinds that make the dataset unfit, with their counts."""
        return {k: n for k, n in self.counts.items() if n and k not in WARNING_KINDS}

    @property
    def warnings(self) -> dict[str, int]:
        """Problem kinds worth knowing that do not block training (duplicates)."""
        return {k: n for k, n in self.counts.items() if n and k in WARNING_KINDS}

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def format(self) -> str:
        """Multi-line human-readable report."""
        lines = [f"dataset {self.dataset} ({self.split}) at {self.root}: {self.num_images} images "
                 f"({self.num_background} background, without defects), {self.num_boxes} boxes"]
        if self.class_counts:
            lines.append("  boxes per class: " + ", ".join(f"{c} {n}" for c, n in self.class_counts.items()))
        for kind in PROBLEM_KINDS:
            n = self.counts.get(kind, 0)
            if not n:
                continue
            level = "warning" if kind in WARNING_KINDS else "error"
            lines.append(f"  {level}: {kind}: {n}")
            lines.extend(f"    {ex}" for ex in self.examples.get(kind, []))
            if n > len(self.examples.get(kind, [])):
                lines.append(f"    ... ({n - len(self.examples.get(kind, []))} more)")
        n_err, n_warn = sum(self.errors.values()), sum(self.warnings.values())
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {n_err} error(s), {n_warn} warning(s)")
        return "\n".join(lines)


def inspect_image(path: str, keep_pixels: bool = False) -> tuple[Optional[str], Optional[tuple[int, int]], Optional[str], Optional[torch.Tensor]]:
    """(sha1 of the bytes, decoded (w, h), error, uint8 [3,H,W] RGB pixels if `keep_pixels`) of one image file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, None, f"cannot read image ({e.strerror or e})", None
    digest = hashlib.sha1(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode every pixel: a truncated file only fails here
            pixels = None
            if keep_pixels:
                pixels = torch.from_numpy(rgb8(im).copy()).permute(2, 0, 1).contiguous()
            return digest, oriented_size(im), None, pixels
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return digest, None, f"cannot read image ({type(e).__name__}: {e})", None


def check_images(dataset: DetectionDataset, problems: Problems, workers: Optional[int] = None,
                 keep_pixels: bool = False, duplicates: bool = True) -> tuple[dict[int, torch.Tensor], set[int]]:
    """Decode every image file of `dataset` once, compare sizes, optionally find byte-identical duplicates.

    Returns (decoded pixels by image_id of the good images when `keep_pixels`, else empty; image_ids of the
    bad images). Training caches the pixels, so the check is the run's only decode. Problems go to `problems`.
    """
    files = [r.file for r in dataset.records]
    # PIL releases the GIL while decoding, so a few threads help without extra processes.
    n = workers if workers is not None else min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        results = list(pool.map(lambda f: inspect_image(f, keep_pixels), files))
    by_digest: dict[str, list[str]] = {}
    pixels: dict[int, torch.Tensor] = {}
    bad: set[int] = set()
    for rec, (digest, size, err, px) in zip(dataset.records, results):
        if digest is not None:
            by_digest.setdefault(digest, []).append(rec.file)
        if err is not None:
            bad.add(rec.image_id)
            problems.add(UNREADABLE_IMAGE, f"{rec.file}: {err}")
        elif size != (rec.width, rec.height):
            bad.add(rec.image_id)
            problems.add(
                SIZE_MISMATCH,
                f"{rec.file}: image is {size[0]}x{size[1]} but the annotation says {rec.width}x{rec.height}",
            )
        elif px is not None:
            pixels[rec.image_id] = px
    if duplicates:
        for group in by_digest.values():
            group = sorted(group)
            for f in group[1:]:
                problems.add(DUPLICATE_IMAGE, f"{f}: same bytes as {group[0]}")
    return pixels, bad


def _check_boxes_only(dataset: DetectionDataset, problems: Problems) -> None:
    """For generated data (no files): every box must be valid inside its image."""
    for r in dataset.records:
        for b in r.boxes:
            check_box(b, r.width, r.height, r.file, problems, tol=0.0)


def _described(path: Path, split: str, problems: Problems) -> DetectionDataset:
    """The records of a description's splits (`split`: all, train or test), with problems collected."""
    d = load_description(path)
    which = {"all": ["train", "val", "test"], "train": ["train"], "trainval": ["train"], "val": ["val"],
             "test": ["test"]}.get(split)
    if which is None:
        raise SdiddError(f"{path}: unknown split {split!r} (all, train, val, test)")
    loaded = [load_described_split(d, w, problems, check=True) for w in which if w in described_splits(d)]
    if not loaded:
        raise SdiddError(f"{path}: has no {split} split")
    classes = list(loaded[0].classes)
    for x in loaded[1:]:  # a VOC split without names takes the names it holds: the union, by name
        classes += [c for c in x.classes if c not in classes]
    records = []
    for x in loaded:
        lut = np.asarray([classes.index(c) for c in x.classes] or [0], dtype=np.int64)
        records += [dataclasses.replace(r, labels=lut[r.labels]) if len(r.labels) else r for r in x.records]
    return DetectionDataset(classes, records, name=d["dataset"])


def _detect(path: Path) -> str:
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return "description"
    if path.is_dir() and (path / "data.yaml").is_file():
        return "description"
    if (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir():
        return "voc"
    if (path / "IMAGES").is_dir() and (path / "ANNOTATIONS").is_dir():
        return "neu-det"
    if find_pcbdata(path) is not None:
        return "deeppcb"
    raise SdiddError(
        f"{path}: cannot tell the dataset format (expected a dataset description .yaml or a folder holding "
        "data.yaml, NEU-DET's IMAGES/ and ANNOTATIONS/, DeepPCB's PCBData/, VOC's Annotations/ and JPEGImages/, "
        "or a COCO .json file)"
    )


def check_dataset(
    name_or_path: str | Path,
    root: Optional[str | Path] = None,
    split: str = "all",
    images_dir: Optional[str | Path] = None,
    workers: Optional[int] = None,
) -> CheckReport:
    """Check a dataset given by name (neu-det, deeppcb, synthetic; coco needs root = the json) or path
    (a dataset description .yaml of any format, a folder holding data.yaml, a dataset folder, a COCO json)."""
    problems = Problems(strict=False)
    s = split.strip().lower()
    p = Path(name_or_path)
    key: Optional[str] = None
    if not p.exists():
        if isinstance(name_or_path, Path) or os.sep in str(name_or_path):
            raise SdiddError(f"{p}: no such file or folder")
        key = canonical_name(str(name_or_path))  # raises a clear error for unknown names
        if key in ("neu-det", "deeppcb"):
            p = resolve_data_root(key, root)
        elif key == "coco":
            if root is None:
                raise SdiddError("check of a COCO dataset needs the .json path (as the path or as root)")
            p = Path(root)
        elif key in ("voc", "yolo"):
            raise SdiddError(f"check of a {key} dataset needs its dataset description (.yaml) or folder")
    key = key if key in ("synthetic",) else _detect(p)

    if key == "synthetic":
        splits = ["train", "test"] if s == "all" else ["train" if s == "trainval" else s]
        datasets = [load_synthetic(sp) for sp in splits]
        ds = DetectionDataset(datasets[0].classes, [r for d in datasets for r in d.records], name="synthetic")
        _check_boxes_only(ds, problems)
        where = "(generated)"
    else:
        if key == "neu-det":
            ds = load_neu_det(p, "train" if s == "trainval" else s, problems=problems)
        elif key == "deeppcb":
            ds = load_deeppcb(p, "trainval" if s == "train" else s, problems=problems)
        elif key == "description":  # a dataset description file (coco, voc, yolo): its splits, as training reads them
            p = p / "data.yaml" if p.is_dir() else p
            ds = _described(p, s, problems)
            key = ds.name
        elif key == "voc":  # a VOC folder (Annotations/ + JPEGImages/): all of its images
            ds = load_voc(p, problems=problems)
        else:
            img_dir = Path(images_dir) if images_dir is not None else (
                p.parent / "images" if (p.parent / "images").is_dir() else p.parent
            )
            ds = load_coco_json(img_dir, p, problems=problems)
        check_images(ds, problems, workers)
        where = str(p.absolute())

    return CheckReport(
        dataset=key,
        root=where,
        split=s,
        num_images=len(ds),
        num_boxes=ds.num_boxes,
        num_background=sum(1 for r in ds.records if len(r.labels) == 0),
        class_counts=ds.class_counts(),
        counts={k: int(problems.counts.get(k, 0)) for k in PROBLEM_KINDS},
        examples={k: list(v) for k, v in problems.examples.items()},
    )
