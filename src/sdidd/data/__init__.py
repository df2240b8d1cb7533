"""Datasets (NEU-DET, DeepPCB, COCO json, Pascal VOC, YOLO txt, built-in synthetic), transforms and batch collation.

`build_dataset` is the one entry point the rest of the project uses; `sdidd.data.check` validates a
dataset on disk before a long run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from sdidd.data.coco_json import load_coco_json
from sdidd.data.deeppcb import DEEPPCB_CLASSES, find_pcbdata, load_deeppcb
from sdidd.data.neu_det import NEU_CLASSES, load_neu_det
from sdidd.data.records import DetectionDataset, Problems, Record
from sdidd.data.synthetic import SYNTHETIC_CLASSES, load_synthetic
from sdidd.data.transforms import EvalTransform, TrainTransform, collate
from sdidd.data.voc import load_voc
from sdidd.data.yolo import load_yolo
from sdidd.errors import SdiddError

__all__ = [
    "Record",
    "DetectionDataset",
    "Problems",
    "collate",
    "TrainTransform",
    "EvalTransform",
    "build_dataset",
    "resolve_data_root",
    "canonical_name",
    "DATASET_NAMES",
    "NEU_CLASSES",
    "DEEPPCB_CLASSES",
    "SYNTHETIC_CLASSES",
    "load_neu_det",
    "load_deeppcb",
    "load_coco_json",
    "load_synthetic",
    "load_voc",
    "load_yolo",
]

DATASET_NAMES = ("synthetic", "neu-det", "deeppcb", "coco", "voc", "yolo")
_ALIASES = {"neudet": "neu-det", "neu": "neu-det", "deep-pcb": "deeppcb", "pcb": "deeppcb"}
_FOLDERS = {"neu-det": "NEU-DET", "deeppcb": "DeepPCB"}
ENV_VAR = "SDIDD_DATA"
_KWARGS = {
    "synthetic": {"num_images", "image_size", "seed"},
    "neu-det": {"problems"},
    "deeppcb": {"problems"},
    "coco": {"images_dir", "ann_file", "problems"},
    "voc": {"split_path", "names", "problems"},
    "yolo": {"split_path", "names", "problems"},
}


def canonical_name(name: str) -> str:
    """Normalise a dataset name ('NEU_DET' -> 'neu-det'); SdiddError if unknown."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise SdiddError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
    return key


def _looks_like(key: str, path: Path) -> bool:
    if key == "neu-det":
        return (path / "IMAGES").is_dir() and (path / "ANNOTATIONS").is_dir()
    return find_pcbdata(path) is not None


def resolve_data_root(name: str, root: Optional[str | Path] = None) -> Path:
    """Folder of dataset `name`: from `root`, else $SDIDD_DATA, else ./data (each may be the dataset
    folder itself or the folder holding NEU-DET/ and DeepPCB/)."""
    key = canonical_name(name)
    if key not in _FOLDERS:
        raise SdiddError(f"dataset {key!r} has no data root (only {', '.join(_FOLDERS)} are read from one)")
    if root is not None and str(root) != "":
        base = Path(root)
    elif os.environ.get(ENV_VAR):
        base = Path(os.environ[ENV_VAR])
    else:
        base = Path("data")
    base = base.expanduser().absolute()
    if _looks_like(key, base):
        return base
    path = base / _FOLDERS[key]
    if _looks_like(key, path):
        return path
    if key == "neu-det":
        expected = f"{path}/IMAGES/*.jpg and {path}/ANNOTATIONS/*.xml"
    else:
        expected = f"{path}/PCBData/trainval.txt, {path}/PCBData/test.txt and PCBData/group*/"
    raise SdiddError(f"{_FOLDERS[key]} not found at {path}: expected {expected}; set {ENV_VAR} or data.root")


def build_dataset(name: str, split: str, root: Optional[str | Path] = None, **kw: Any) -> DetectionDataset:
    """Build dataset `name` (synthetic, neu-det, deeppcb, coco, voc, yolo) for `split`.

    'train' and 'trainval' are accepted for every dataset. Extra keywords: `transform` (all),
    `problems` (file datasets), num_images/image_size/seed (synthetic),
    images_dir/ann_file (coco), split_path/names (voc, yolo; names required for yolo); for coco, voc
    and yolo `split` is only a label and relative paths are taken from `root`.
    """
    key = canonical_name(name)
    transform = kw.pop("transform", None)
    extra = sorted(set(kw) - _KWARGS[key])
    if extra:
        raise SdiddError(
            f"dataset {key!r} does not take option(s) {', '.join(extra)} "
            f"(it takes: {', '.join(sorted(_KWARGS[key])) or 'none'})"
        )
    s = split.strip().lower()
    if key == "synthetic":
        ds = load_synthetic("train" if s in ("train", "trainval") else s, **kw)
    elif key == "neu-det":
        ds = load_neu_det(resolve_data_root(key, root), "train" if s == "trainval" else s, **kw)
    elif key == "deeppcb":
        ds = load_deeppcb(resolve_data_root(key, root), "trainval" if s == "train" else s, **kw)
    elif key in ("voc", "yolo"):
        if "split_path" not in kw:
            raise SdiddError(f"dataset {key!r} needs split_path")
        base = Path(root) if root is not None else Path(".")
        split_path, names = base / kw.pop("split_path"), kw.pop("names", None)
        if key == "voc":
            ds = load_voc(split_path, root, names, **kw)
        elif not names:
            raise SdiddError("dataset 'yolo' needs names (the class of label index 0, 1, ...)")
        else:
            ds = load_yolo(split_path, names, **kw)
    else:
        try:
            images_dir, ann_file = kw.pop("images_dir"), kw.pop("ann_file")
        except KeyError:
            raise SdiddError("dataset 'coco' needs images_dir and ann_file") from None
        base = Path(root) if root is not None else Path(".")
        ds = load_coco_json(base / images_dir, base / ann_file, **kw)
    ds.transform = transform
    return ds
