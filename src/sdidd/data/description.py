"""Dataset description files: one small YAML per dataset, separate from the training recipe.

A description names where a dataset lives and in which format; `sdidd train RECIPE data=FILE`,
`sdidd add-classes TEACHER FILE`, `sdidd eval CKPT data=FILE` and `sdidd check-data FILE` read it.

```yaml
format: coco                   # coco | voc | yolo; without it, read from what `train` is (.json, images + labels/, VOC)
path: .                        # folder the paths below are relative to (default: this file's folder)
train: annotations/train.json  # coco: json; voc: ImageSets list, VOC folder or folder of pairs; yolo: image folder
test: annotations/test.json    # optional (or `val`): the test split, same kinds as `train`
images: images                 # coco only: image folder of both splits (or train_images / test_images per split)
names: [patch, crack]          # coco, voc: optional check / class order; yolo: required (a list, or {0: a, 1: b})
```
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional


from ..errors import SdiddError, shown
from ..yaml_file import load_yaml
from .formats import FORMATS, SPLITS

log = logging.getLogger(__name__)

_KEYS = {"format", "path", "train", "test", "val", "names", "nc", *(k for f in FORMATS.values() for k in f.keys)}
_IGNORED = {"roboflow", "download"}  # ultralytics / Roboflow keys about where the data came from


def _names(p: Path, desc: dict[str, Any], fmt: str) -> Optional[list[str]]:
    """The class names of a description (a list, or YOLO's {index: name} mapping); None if not given."""
    names = desc.get("names")
    if names is None:
        if FORMATS[fmt].needs_names:
            raise SdiddError(f"{p}: a {fmt.upper()} description needs 'names' (the class of label index 0, 1, ...)")
        return None
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or sorted(keys) != list(range(len(keys))):
            raise SdiddError(f"{p}: 'names' as a mapping needs the keys 0..{len(keys) - 1} (class indices), got {shown(keys)}")
        names = [names[k] for k in range(len(keys))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise SdiddError(f"{p}: 'names' must be a list of non-empty class names, got {shown(desc.get('names'))}")
    names = [n.strip() for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SdiddError(f"{p}: 'names' lists class {shown(dup[0])} twice")
    nc = desc.get("nc")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc != len(names)):
        raise SdiddError(f"{p}: 'nc' is {shown(nc)} but 'names' has {len(names)} classes")
    return names


def load_description(path: str | Path) -> dict[str, Any]:
    """The `data` config section a description file stands for (absolute paths); one SdiddError line if malformed."""
    p = Path(path)
    if not p.is_file():
        raise SdiddError(f"{p}: dataset description not found")
    desc = load_yaml(p)
    if not isinstance(desc, dict):
        raise SdiddError(f"{p}: a dataset description is a mapping (format, path, train, test, names)")
    ignored = sorted(set(map(str, desc)) & _IGNORED)
    if ignored:
        log.warning(f"warning: {p}: {', '.join(ignored)} ignored (where the data came from; sdidd reads the local files)")
        desc = {k: v for k, v in desc.items() if k not in _IGNORED}
    unknown = sorted(set(map(str, desc)) - _KEYS)
    if unknown:
        raise SdiddError(f"{p}: unknown key {shown(unknown[0])} (valid: {', '.join(sorted(_KEYS))})")
    for k in ("path", "train", "test", "val", "images", "train_images", "test_images", "val_images"):
        v = desc.get(k)
        listed = k in ("train", "test", "val") and isinstance(v, list) and v  # ultralytics: several image folders
        if k in desc and not (isinstance(v, str) and v.strip()) and not (listed and all(isinstance(x, str) and x.strip() for x in v)):
            raise SdiddError(f"{p}: '{k}' must be a path (a string{', or a list of them' if k in ('train', 'test', 'val') else ''}), "
                             f"got {shown(v)}")
    fmt = desc.get("format")
    if fmt is None:
        fmt, why = _detect_format(p, desc)
        log.info(f"{p}: no 'format' key, read as {fmt} ({why}); add format: coco, voc or yolo to choose")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise SdiddError(f"{p}: format {shown(fmt)} is not supported ({', '.join(FORMATS)})")
    entry = FORMATS[fmt]
    listed = [k for k in SPLITS if isinstance(desc.get(k), list) or str(desc.get(k, "")).endswith(".txt")]
    if listed and not entry.lists and (fmt != "voc" or any(isinstance(desc.get(k), list) for k in listed)):
        raise SdiddError(f"{p}: '{listed[0]}' lists images or folders, a YOLO form; a {fmt} split is one file or folder")
    foreign = [(k, f) for f, other in FORMATS.items() if f != fmt for k in other.keys if k in desc]
    if foreign:
        raise SdiddError(f"{p}: '{foreign[0][0]}' is a {foreign[0][1]} key; a {fmt} description names its image folders "
                         "in train/val/test")
    names = _names(p, desc, fmt)
    if not any(k in desc for k in SPLITS):
        raise SdiddError(f"{p}: neither 'train' nor 'test' (or 'val') is given")
    root = _root(p, desc)

    def split(key: str) -> Optional[str | list[str]]:
        if key not in desc:
            return None
        if isinstance(desc[key], list):
            return [str(_under(root, v)) for v in desc[key]]
        return str(_under(root, desc[key]))
    section: dict[str, Any] = {"dataset": fmt, "root": str(root), "names": names,
                               **{entry.split_key.format(k): split(k) for k in SPLITS}}
    if fmt == "coco":  # the image folders of its splits (a json names files relative to them)
        images = desc.get("images", ".")
        section.update({"images_dir": str(root / desc.get("train_images", images)),
                        "test_images_dir": str(root / desc.get("test_images", images)),
                        "val_images_dir": str(root / desc.get("val_images", desc.get("test_images", images)))})
    return section


def _root(p: Path, desc: Mapping[str, Any]) -> Path:
    """The folder a description's paths are relative to: its `path` (relative to the file), else the file's folder."""
    try:
        return (p.parent / desc.get("path", ".")).resolve()
    except (OSError, ValueError) as e:  # e.g. a NUL byte in the path
        raise SdiddError(f"{p}: 'path' {shown(desc.get('path'))} is no usable folder ({e})") from None


def _under(root: Path, rel: str) -> Path:
    """`rel` below `root`; a '../x' that is not there is tried as 'x', as ultralytics does for Roboflow exports."""
    path = (root / rel).resolve()
    if not path.exists() and rel.startswith("../") and (root / rel[3:]).exists():
        return (root / rel[3:]).resolve()
    return path


def _detect_format(p: Path, desc: Mapping[str, Any]) -> tuple[str, str]:
    """(format, why) of a description without a `format` key, from what its first split is on disk."""
    key = next((k for k in SPLITS if k in desc), None)
    if key is None:
        raise SdiddError(f"{p}: neither 'train' nor 'test' (or 'val') is given")
    if isinstance(desc[key], list):
        return "yolo", f"'{key}' is a list of image folders, as ultralytics reads them"
    path = _under(_root(p, desc), desc[key])
    for name, fmt in FORMATS.items():
        why = fmt.recognise(path, desc)
        if why:
            return name, f"'{key}' is {why}"
    what = "is not found" if not path.exists() else "does not show which format it is"
    raise SdiddError(f"{p}: no 'format' key, and '{key}' ({path}) {what} (a .json is coco, an image folder with labels/ "
                     "beside it yolo, a folder with Annotations/ voc); add format: coco, voc or yolo")
