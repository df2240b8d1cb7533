"""Hostile and sloppy annotation files, through `sdidd check-data` (the code path users run first).

For each format a small clean dataset is mutated a few hundred times, seeded: keys or elements deleted, values
replaced by None, -1, 1e12, NaN, strings, lists, dicts, booleans, in the annotation files and in the dataset
description. Every outcome must be a report (exit 0 / 1, problems counted) or one `error: ` line (exit 2);
any traceback fails the test with the mutation that caused it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from PIL import Image

from sdidd.cli import main

CASES = 300  # mutations per format
VALUES: list[Any] = [None, -1, 1e12, float("nan"), "x", "", "-1", [], [1, "a"], {}, {"k": 1}, True, False, 0, 2.5]
NAMES = ["scratch", "spot"]
SIZE = 16


def _images(folder: Path, n: int = 3) -> list[str]:
    """n distinct tiny PNGs in `folder`; their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = np.full((SIZE, SIZE, 3), 40 * i, np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def _slots(node: Any, path: tuple = ()) -> list[tuple]:
    """Every (path to a container, key or index) in a JSON-like tree."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out.append((path, k))
        out += _slots(v, path + (k,))
    return out


def mutate_tree(doc: Any, rng: random.Random) -> tuple[Any, list[str]]:
    """1-3 mutations of a JSON-like tree: a key or element deleted, or a value replaced."""
    doc = copy.deepcopy(doc)
    done = []
    for _ in range(rng.randint(1, 3)):
        slots = _slots(doc)
        if not slots:
            break
        path, key = rng.choice(slots)
        parent = doc
        for p in path:
            parent = parent[p]
        if rng.random() < 0.3:
            del parent[key]
            done.append(f"del {list(path) + [key]}")
        else:
            v = copy.deepcopy(rng.choice(VALUES))
            parent[key] = v
            done.append(f"{list(path) + [key]} = {v!r}")
    return doc, done


def check(case_dir: Path, desc: Any, what: list[str], outcomes: Counter, failures: list[str]) -> None:
    """Write the (possibly mutated) description, run `sdidd check-data` on it, classify the outcome."""
    path = case_dir / "data.yaml"
    path.write_text(yaml.safe_dump(desc, allow_unicode=True))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["check-data", str(path)])
    except BaseException:  # noqa: BLE001 - a traceback (or exit) is what this test forbids
        failures.append(f"{case_dir.name} {what}:\n{traceback.format_exc(limit=-3)}")
        return
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    if rc == 0:
        ok = not lines
        outcomes["clean" if "OK: 0 error(s), 0 warning(s)" in out.getvalue() else "warnings"] += 1
    else:
        ok = rc in (1, 2) and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err.getvalue()
        outcomes["problems reported" if rc == 1 else "one-line error"] += 1
    if not ok:
        failures.append(f"{case_dir.name} {what}: rc {rc}, stderr {err.getvalue()!r}")


def _run(tmp_path: Path, make_case: Callable[[Path, random.Random], tuple[dict, list[str]]], seed: int,
         min_rejected: int = CASES // 3) -> Counter:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    failures: list[str] = []
    for i in range(CASES):
        case_dir = tmp_path / f"case{i:03d}"
        case_dir.mkdir()
        desc, what = make_case(case_dir, rng)
        if rng.random() < 0.15:  # the description itself is hostile too
            desc, more = mutate_tree(desc, rng)
            what = what + [f"data.yaml: {m}" for m in more]
        check(case_dir, desc, what, outcomes, failures)
    assert not failures, f"{len(failures)} of {CASES} mutations crashed, first:\n" + "\n".join(failures[:3])
    # The mutations reach every outcome: not all rejected early, not all ignored.
    assert outcomes["problems reported"] + outcomes["one-line error"] > min_rejected, outcomes
    print(dict(outcomes))
    return outcomes


# ---------------------------------------------------------------- COCO json

def test_fuzz_coco_json(tmp_path: Path) -> None:
    images = tmp_path / "images"
    files = _images(images)
    base = {"images": [{"id": i + 1, "file_name": f, "width": SIZE, "height": SIZE} for i, f in enumerate(files)],
            "categories": [{"id": 1, "name": "scratch"}, {"id": 2, "name": "spot"}],
            "annotations": [{"id": k + 1, "image_id": 1 + k % 3, "category_id": 1 + k % 2, "bbox": [1, 2, 6, 5],
                             "area": 30, "iscrowd": 0} for k in range(4)]}

    def make_case(case_dir: Path, rng: random.Random) -> tuple[dict, list[str]]:
        doc, what = mutate_tree(base, rng)
        (case_dir / "train.json").write_text(json.dumps(doc))  # NaN is written as NaN, as Python's json reads it
        return {"format": "coco", "path": ".", "train": "train.json", "images": str(images), "names": NAMES}, what

    outcomes = _run(tmp_path, make_case, seed=13)
    assert outcomes["one-line error"] + outcomes["problems reported"] < CASES  # some mutations are harmless


# ---------------------------------------------------------------- Pascal VOC XML

def _voc_xml(name: str, k: int) -> ET.Element:
    root = ET.fromstring(
        f"<annotation><filename>{name}</filename><size><width>{SIZE}</width><height>{SIZE}</height><depth>3</depth></size>"
        f"<object><name>{NAMES[k % 2]}</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>9</xmax>"
        f"<ymax>12</ymax></bndbox></object><object><name>{NAMES[(k + 1) % 2]}</name><bndbox><xmin>5</xmin><ymin>5</ymin>"
        f"<xmax>16</xmax><ymax>16</ymax></bndbox></object></annotation>")
    return root


def _mutate_xml(root: ET.Element, rng: random.Random) -> list[str]:
    done = []
    for _ in range(rng.randint(1, 3)):
        parents = [(p, c) for p in root.iter() for c in list(p)]
        if not parents:
            break
        parent, child = rng.choice(parents)
        r = rng.random()
        if r < 0.3:
            parent.remove(child)
            done.append(f"del <{child.tag}>")
        elif r < 0.8:
            v = rng.choice(VALUES)
            child.text = str(v)
            for c in list(child):
                child.remove(c)
            done.append(f"<{child.tag}> = {v!r}")
        else:  # structure where a value was expected, or a value where structure was
            ET.SubElement(child, rng.choice(["size", "object", "name", "bndbox", "x"])).text = str(rng.choice(VALUES))
            done.append(f"<{child.tag}> gains a child")
    return done


def test_fuzz_voc_xml(tmp_path: Path) -> None:
    images = tmp_path / "shared_images"
    files = _images(images)

    def make_case(case_dir: Path, rng: random.Random) -> tuple[dict, list[str]]:
        (case_dir / "Annotations").mkdir()
        (case_dir / "JPEGImages").symlink_to(images, target_is_directory=True)
        target = rng.randrange(len(files))
        what: list[str] = []
        for k, f in enumerate(files):
            root = _voc_xml(f, k)
            if k == target:
                what = [f"{f}: {m}" for m in _mutate_xml(root, rng)]
            text = ET.tostring(root, encoding="unicode")
            if k == target and rng.random() < 0.1:
                text = text[: rng.randrange(len(text))]  # cut short
                what.append("truncated")
            (case_dir / "Annotations" / f"{Path(f).stem}.xml").write_text(text)
        stems = [Path(f).stem for f in files]
        if rng.random() < 0.2:
            stems.append(rng.choice([stems[0], "ghost", "a b c", ""]))
            what.append(f"list + {stems[-1]!r}")
        (case_dir / "ImageSets" / "Main").mkdir(parents=True)
        (case_dir / "ImageSets" / "Main" / "train.txt").write_text("\n".join(stems) + "\n")
        names = NAMES if rng.random() < 0.7 else None  # without names: any class name the XML holds
        desc = {"format": "voc", "path": ".", "train": "ImageSets/Main/train.txt", **({"names": names} if names else {})}
        return desc, what

    _run(tmp_path, make_case, seed=7)


# ---------------------------------------------------------------- YOLO txt + yaml

def test_fuzz_yolo_txt_and_yaml(tmp_path: Path) -> None:
    images = tmp_path / "shared_images"
    files = _images(images)
    clean = [[["0", "0.35", "0.4", "0.3", "0.25"], ["1", "0.6", "0.6", "0.5", "0.5"]] for _ in files]

    def make_case(case_dir: Path, rng: random.Random) -> tuple[dict, list[str]]:
        (case_dir / "images").mkdir()
        (case_dir / "images" / "train").symlink_to(images, target_is_directory=True)
        labels = case_dir / "labels" / "train"
        labels.mkdir(parents=True)
        rows = copy.deepcopy(clean)
        what = []
        for _ in range(rng.randint(1, 3)):
            f, ln = rng.randrange(len(rows)), rng.randrange(2)
            line = rows[f][ln]
            r = rng.random()
            if r < 0.15 and line:
                line.pop(rng.randrange(len(line)))
                what.append(f"{f}:{ln} token deleted")
            elif r < 0.25:
                line.append(str(rng.choice(VALUES)))
                what.append(f"{f}:{ln} token added")
            elif line:
                t, v = rng.randrange(len(line)), rng.choice(VALUES)
                line[t] = str(v) if not isinstance(v, float) else repr(v)
                what.append(f"{f}:{ln}[{t}] = {line[t]!r}")
        skip = rng.randrange(len(files)) if rng.random() < 0.1 else None
        for k, f in enumerate(files):
            if k == skip:
                what.append(f"{f}: no label file")
                continue
            (labels / f"{Path(f).stem}.txt").write_text("".join(" ".join(row) + "\n" for row in rows[k]))
        return {"format": "yolo", "path": ".", "train": "images/train", "names": {0: NAMES[0], 1: NAMES[1]}}, what

    # As ultralytics reads YOLO labels, a box a little past the border is clipped and a missing label file is a
    # background image, so fewer of these mutations are errors than in the other formats (measured: 53 of 300).
    _run(tmp_path, make_case, seed=11, min_rejected=CASES // 8)
