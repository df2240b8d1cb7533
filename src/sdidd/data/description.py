"""Dataset description files: one small YAML per dataset, separate from the training recipe.

A description names where a dataset lives and in which format; `sdidd train RECIPE data=FILE`,
`sdidd add-classes TEACHER FILE` and `sdidd check-data FILE` read it. Today's format is COCO json:

```yaml
format: coco
path: .                        # folder the paths below are relative to (default: this file's folder)
train: annotations/train.json  # COCO json of the training images (optional for a test-only set)
test: annotations/test.json    # optional: COCO json of the test images
images: images                 # image folder of both splits (or train_images / test_images per split)
names: [patch, crack]          # optional: the class names the annotations must hold, in this order
```
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import SdiddError

_KEYS = {"format", "path", "train", "test", "val", "images", "train_images", "test_images", "names"}


def load_description(path: str | Path) -> dict[str, Any]:
    """The `data` config section a description file stands for (absolute paths); one SdiddError line if malformed."""
    p = Path(path)
    if not p.is_file():
        raise SdiddError(f"{p}: dataset description not found")
    try:
        desc = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        raise SdiddError(f"{p}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
    if not isinstance(desc, dict):
        raise SdiddError(f"{p}: a dataset description is a mapping (format, path, train, test, images)")
    unknown = sorted(set(map(str, desc)) - _KEYS)
    if unknown:
        raise SdiddError(f"{p}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(_KEYS))})")
    fmt = desc.get("format", "coco")
    if fmt != "coco":
        raise SdiddError(f"{p}: format {fmt!r} is not supported (coco)")
    for k in ("path", "train", "test", "val", "images", "train_images", "test_images"):
        if k in desc and not isinstance(desc[k], str):
            raise SdiddError(f"{p}: '{k}' must be a path (a string), got {desc[k]!r}")
    names = desc.get("names")
    if names is not None and (not isinstance(names, list) or not names
                              or not all(isinstance(n, str) and n.strip() for n in names)):
        raise SdiddError(f"{p}: 'names' must be a list of non-empty class names, got {names!r}")
    test = desc.get("test", desc.get("val"))
    if "train" not in desc and not test:
        raise SdiddError(f"{p}: neither 'train' nor 'test' (annotation files) is given")
    root = (p.parent / desc.get("path", ".")).resolve()
    images = desc.get("images", ".")
    out: dict[str, Any] = {
        "dataset": "coco", "root": str(root),
        "train_ann": str(root / desc["train"]) if "train" in desc else None, "test_ann": str(root / test) if test else None,
        "images_dir": str(root / desc.get("train_images", images)),
        "test_images_dir": str(root / desc.get("test_images", images)),
        "names": list(names) if names else None,
    }
    return out
