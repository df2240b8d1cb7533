"""The dataset formats a description (`data.yaml`) can name, in one table: how each one's split is loaded, which
`data` keys hold it, and how its files are recognised when the description has no `format` key.

Adding a format is its loader module plus one entry of :data:`FORMATS`; loading, descriptions, format detection
and `check-data` read the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..errors import SdiddError
from .coco_json import load_coco_json
from .records import UNKNOWN_CLASS, DetectionDataset, Problems
from .voc import load_voc
from .yolo import labels_dir_of, load_yolo

SPLITS = ("train", "val", "test")

# (data section, split name, problems, check) -> the split; `check` collects a problem instead of raising.
Loader = Callable[[Mapping[str, Any], str, Problems, bool], DetectionDataset]


@dataclass(frozen=True)
class Format:
    """One dataset format: its split loader, the `data` key of a split, its own description keys, its signature."""

    load: Loader
    split_key: str  # "{split}_ann" / "{split}_path": the data section key naming a split's file or folder
    recognise: Callable[[Path, Mapping[str, Any]], Optional[str]]  # why a split path is in this format, else None
    keys: tuple[str, ...] = ()  # description keys only this format takes
    needs_names: bool = False  # the description must give the class names (label files hold indices)
    lists: bool = False  # a split may be a list of folders or a .txt list of images


def _load_coco(section: Mapping[str, Any], which: str, problems: Problems, check: bool) -> DetectionDataset:
    ann = section.get(f"{which}_ann")
    images = section["images_dir"] if which == "train" else (section.get(f"{which}_images_dir") or section["images_dir"])
    if not images:
        raise SdiddError("config key 'data.images_dir' is needed for a coco dataset")
    if ann is None:
        raise SdiddError(f"config key 'data.{which}_ann': the coco dataset has no {which} split")
    ds = load_coco_json(images, ann, problems=problems)
    names = section.get("names")
    if names is not None and ds.classes and list(ds.classes) != list(names):  # (no classes: the file failed, said so)
        msg = f"{ann}: categories {list(ds.classes)} differ from the description's names {list(names)}"
        if not check:
            raise SdiddError(msg)
        problems.add(UNKNOWN_CLASS, msg)
    return ds


def _split_path(section: Mapping[str, Any], which: str) -> Any:
    path = section.get(f"{which}_path")
    if path is None:
        raise SdiddError(f"config key 'data.{which}_path': the {section['dataset']} dataset has no {which} split")
    return path


def _load_voc(section: Mapping[str, Any], which: str, problems: Problems, check: bool) -> DetectionDataset:
    return load_voc(_split_path(section, which), section.get("root"), section.get("names"), problems=problems)


def _load_yolo(section: Mapping[str, Any], which: str, problems: Problems, check: bool) -> DetectionDataset:
    path = _split_path(section, which)
    if not section.get("names"):
        raise SdiddError("config key 'data.names': a yolo dataset needs its class names")
    return load_yolo(path, section["names"], problems=problems)


def _is_coco(path: Path, desc: Mapping[str, Any]) -> Optional[str]:
    return "a .json file" if path.suffix.lower() == ".json" else None


def _is_voc(path: Path, desc: Mapping[str, Any]) -> Optional[str]:
    if path.is_dir() and ((path / "Annotations").is_dir() or next(path.glob("*.xml"), None) is not None):
        return "a VOC folder"
    if path.suffix.lower() == ".txt" and "ImageSets" in path.parts:
        return "a VOC ImageSets list"
    return None


def _is_yolo(path: Path, desc: Mapping[str, Any]) -> Optional[str]:
    if path.is_dir() and labels_dir_of(path) != path and labels_dir_of(path).is_dir():
        return "an image folder with its labels/ folder beside it"
    if path.is_dir() and ("nc" in desc or isinstance(desc.get("names"), dict)):
        return "an image folder, with 'nc' or 'names' as a mapping as ultralytics writes them"
    if path.suffix.lower() == ".txt":
        return "a .txt list of images, as ultralytics reads it"
    return None


# Order matters for recognition: the first format that recognises a path wins (a VOC ImageSets .txt before YOLO's).
FORMATS: dict[str, Format] = {
    "coco": Format(_load_coco, "{}_ann", _is_coco, keys=("images", "train_images", "test_images", "val_images")),
    "voc": Format(_load_voc, "{}_path", _is_voc),
    "yolo": Format(_load_yolo, "{}_path", _is_yolo, needs_names=True, lists=True),
}


def described_splits(section: Mapping[str, Any]) -> list[str]:
    """The splits ('train', 'val', 'test') a described dataset (a `data` section of a format above) has."""
    key = FORMATS[section["dataset"]].split_key
    return [s for s in SPLITS if section.get(key.format(s))]


def load_described_split(section: Mapping[str, Any], which: str, problems: Problems, check: bool = False) -> DetectionDataset:
    """The `which` ('train', 'val' or 'test') split of a described dataset.

    COCO categories that differ from the description's `names` are an error (with `check`: a counted problem).
    """
    if which not in SPLITS:
        raise SdiddError(f"split {which!r}: a described dataset has train, val and test splits")
    fmt = FORMATS.get(section["dataset"])
    if fmt is None:
        raise SdiddError(f"dataset {section['dataset']!r} is not a described format ({', '.join(FORMATS)})")
    return fmt.load(section, which, problems, check)
