"""Dataset descriptions in the three formats (COCO json, Pascal VOC, YOLO txt): loaders, `check-data`, sizes from the
data, eval / predict keeping the dataset's ids, and a packaged recipe found from outside the checkout.

The datasets are the built-in defects written out small by `sdidd demo --export DIR --format all` (64 px images);
each broken case copies one format's `base` dataset, breaks one thing and asserts the one line `check-data` prints.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from sdidd.cli import setup_logging
from sdidd.config import DataConfig, config_from_dict, load_config, replaced
from sdidd.data.check import check_dataset
from sdidd.data.description import load_description
from sdidd.data.formats import load_described_split
from sdidd.data.image_size import choose_image_size
from sdidd.data.records import Problems, Record
from sdidd.data.voc import load_voc
from sdidd.data.yolo import labels_dir_of, load_yolo
from sdidd.demo import export_defects
from sdidd.errors import SdiddError
from test_cli_errors import error_line as one_line
from test_cli_errors import run_cli as run

FORMATS = ("coco", "voc", "yolo")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in defects in every format: DIR/<format>/{base,new,all_test}/data.yaml."""
    root = tmp_path_factory.mktemp("formats")
    written = export_defects(root, num_train_images=12, num_test_images=6, image_size=64, formats=FORMATS)
    assert set(written) == {f"{f}/{n}" for f in FORMATS for n in ("base", "new", "all_test")}
    return root


def _records(desc: Path, which: str) -> tuple[list[str], list[Record]]:
    ds = load_described_split(load_description(desc), which, Problems(strict=True))
    return ds.classes, ds.records


# ---------------------------------------------------------------- one dataset, three formats, the same records

@pytest.mark.parametrize("folder", ["base", "new", "all_test"])
def test_three_formats_load_to_identical_records(exported: Path, folder: str) -> None:
    for which in ("train", "test") if folder != "all_test" else ("test",):
        ref_classes, ref = _records(exported / "coco" / folder / "data.yaml", which)
        assert ref and sum(len(r.labels) for r in ref) > 0
        for fmt in ("voc", "yolo"):
            classes, recs = _records(exported / fmt / folder / "data.yaml", which)
            assert classes == ref_classes, fmt
            assert [Path(r.file).name for r in recs] == [Path(r.file).name for r in ref], fmt
            for a, b in zip(ref, recs):
                assert (a.image_id, a.width, a.height) == (b.image_id, b.width, b.height), (fmt, a.file)
                np.testing.assert_array_equal(a.labels, b.labels)
                np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3, err_msg=f"{fmt} {a.file}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_exports_pass_check_data(exported: Path, capsys: pytest.CaptureFixture, fmt: str) -> None:
    for folder in ("base", "new", "all_test"):
        rc, out, err = run(["check-data", str(exported / fmt / folder / "data.yaml")], capsys)
        assert rc == 0 and err == "" and "OK: 0 error(s), 0 warning(s)" in out, out + err
        assert out.startswith(f"dataset {fmt} (all)")
    rc, out, _ = run(["check-data", str(exported / fmt / "base"), "--split", "test"], capsys)  # a folder holding data.yaml
    assert rc == 0 and "(test)" in out


# ---------------------------------------------------------------- loaders on hand-written layouts

def _png(path: Path, w: int = 40, h: int = 30, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, np.uint8)
    arr[0, 0] = (value * 7 + 1) % 256  # distinct bytes per value: no duplicate warnings
    Image.fromarray(arr).save(path)


def _voc_xml(objs: list[tuple[str, tuple[int, int, int, int]]], w: int = 40, h: int = 30) -> str:
    o = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objs)
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{o}</annotation>"


def test_voc_layouts_list_file_voc_folder_and_flat_pairs(tmp_path: Path) -> None:
    voc = tmp_path / "VOC2007"
    for i, stem in enumerate(("b", "a", "c")):
        _png(voc / "JPEGImages" / f"{stem}.jpg", value=i * 40)
        (voc / "Annotations").mkdir(exist_ok=True)
        (voc / "Annotations" / f"{stem}.xml").write_text(_voc_xml([("dent", (1, 1, 10, 10)), ("stain lake", (5, 6, 20, 30))]))
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("b\na\n\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("c 1\n")
    ds = load_voc(voc / "ImageSets" / "Main" / "train.txt")
    assert ds.classes == ["dent", "stain lake"]  # any class names, sorted when the description names none
    assert [Path(r.file).name for r in ds.records] == ["a.jpg", "b.jpg"] and [r.image_id for r in ds.records] == [1, 2]
    np.testing.assert_array_equal(ds.records[0].boxes, [[0, 0, 10, 10], [4, 5, 20, 30]])  # 1-based inclusive -> 0-based
    assert len(load_voc(voc)) == 3  # the VOC folder itself: every image
    assert load_voc(voc / "ImageSets" / "Main" / "test.txt", names=["stain lake", "dent"]).records[0].labels.tolist() == [1, 0]

    flat = tmp_path / "flat"
    _png(flat / "x.png")
    (flat / "x.xml").write_text(_voc_xml([("dent", (1, 1, 10, 10))]))
    assert load_voc(flat).records[0].labels.tolist() == [0]

    desc = tmp_path / "voc.yaml"
    desc.write_text(yaml.safe_dump({"format": "voc", "path": "VOC2007", "train": "ImageSets/Main/train.txt",
                                    "val": "ImageSets/Main/test.txt", "names": ["dent", "stain lake"]}))
    section = load_description(desc)
    assert section["dataset"] == "voc" and section["val_path"].endswith("test.txt") and section["test_path"] is None
    cfg = config_from_dict({"data": section})
    assert cfg.data.dataset == "voc"
    rep = check_dataset(desc)
    assert rep.ok and rep.num_images == 3 and rep.class_counts == {"dent": 3, "stain lake": 3}, rep.format()


def test_yolo_layout_names_mapping_and_negatives(tmp_path: Path) -> None:
    root = tmp_path / "line"
    _png(root / "images" / "train" / "a.png", w=100, h=50)
    _png(root / "images" / "train" / "sub" / "b.png", w=100, h=50, value=9)
    (root / "labels" / "train" / "sub").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.1 0.1\n")
    (root / "labels" / "train" / "sub" / "b.txt").write_text("")  # an image without defects
    assert labels_dir_of(root / "images" / "train") == root / "labels" / "train"
    ds = load_yolo(root / "images" / "train", ["hole", "scratch"])
    assert [Path(r.file).name for r in ds.records] == ["a.png", "b.png"]
    np.testing.assert_allclose(ds.records[0].boxes, [[40, 15, 60, 35], [5, 2.5, 15, 7.5]], atol=1e-4)
    assert ds.records[0].labels.tolist() == [1, 0] and len(ds.records[1].labels) == 0

    desc = root / "data.yaml"
    desc.write_text(yaml.safe_dump({"format": "yolo", "path": ".", "train": "images/train", "val": "images/train",
                                    "nc": 2, "names": {0: "hole", 1: "scratch"}}))
    section = load_description(desc)
    assert section["names"] == ["hole", "scratch"] and section["train_path"] == str(root / "images" / "train")
    assert check_dataset(desc, split="train").ok


# ---------------------------------------------------------------- broken datasets: each gives its one line

def _first_label(root: Path, fmt: str) -> Path:
    if fmt == "yolo":
        return next(p for p in sorted((root / "labels" / "train").glob("*.txt")) if p.read_text().strip())
    if fmt == "voc":
        stem = (root / "ImageSets" / "Main" / "train.txt").read_text().split()[0]
        return root / "Annotations" / f"{stem}.xml"
    return root / "annotations" / "train.json"


def _first_image(root: Path, fmt: str) -> Path:
    if fmt == "voc":
        stem = (root / "ImageSets" / "Main" / "train.txt").read_text().split()[0]
        return root / "JPEGImages" / f"{stem}.png"
    return sorted((root / "images" / "train").glob("*.png"))[0]


def _set_coco(root: Path, edit: Callable[[dict], None]) -> None:
    path = root / "annotations" / "train.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _voc_box(root: Path, values: tuple[int, int, int, int], name: str = "scratch") -> None:
    _first_label(root, "voc").write_text(_voc_xml([(name, values)], 64, 64))


BROKEN: dict[str, tuple[str, Callable[[Path], None], str, str]] = {
    # (format, mutation of a clean copy, problem kind, text of the one line)
    "yolo class index out of range": ("yolo", lambda r: _first_label(r, "yolo").write_text("2 0.5 0.5 0.1 0.1\n"),
                                      "unknown_class", ".txt:1: class index 2 is out of range (names has 2: 0..1)"),
    "yolo box outside the image": ("yolo", lambda r: _first_label(r, "yolo").write_text("0 0.9 0.5 0.5 0.1\n"),
                                   "bad_box", ".txt:1: box cx=0.9 cy=0.5 w=0.5 h=0.1 is outside the 64x64 image"),
    "yolo malformed line": ("yolo", lambda r: _first_label(r, "yolo").write_text("0 0.5 0.5 0.1\n"),
                            "malformed_annotation", ".txt:1: expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 ...', "
                                                    "got '0 0.5 0.5 0.1'"),
    "yolo unreadable image": ("yolo", lambda r: _first_image(r, "yolo").write_bytes(b"not a png"),
                              "unreadable_image", ".png: cannot read image"),
    "yolo label without image": ("yolo", lambda r: (r / "labels" / "train" / "ghost.txt").write_text(""),
                                 "missing_image", "ghost.txt: no image for this label file"),
    "voc missing label file": ("voc", lambda r: _first_label(r, "voc").unlink(), "missing_annotation", ".xml not found"),
    "voc class not in names": ("voc", lambda r: _voc_box(r, (2, 2, 20, 20), "dent"),
                               "unknown_class", "object 0 has unknown class name 'dent' (valid: scratch, spot)"),
    "voc box outside the image": ("voc", lambda r: _voc_box(r, (5, 5, 90, 20)),
                                  "bad_box", "object 0 (scratch): box xmin=5 ymin=5 xmax=90 ymax=20 is outside the 64x64 image"),
    "voc malformed xml": ("voc", lambda r: _first_label(r, "voc").write_text("<annotation><size>"),
                          "malformed_annotation", ".xml: malformed XML"),
    "voc unreadable image": ("voc", lambda r: _first_image(r, "voc").write_bytes(b"\x89PNG truncated"),
                             "unreadable_image", ".png: cannot read image"),
    "voc duplicate file": ("voc", lambda r: (r / "ImageSets/Main/train.txt").write_text(
        (r / "ImageSets/Main/train.txt").read_text() + (r / "ImageSets/Main/train.txt").read_text().split()[0] + "\n"),
        "malformed_annotation", "is listed twice"),
    "coco no annotations key": ("coco", lambda r: _set_coco(r, lambda d: d.pop("annotations")),
                                "malformed_annotation", "train.json: no 'annotations' key"),
    "coco annotations a number": ("coco", lambda r: _set_coco(r, lambda d: d.update(annotations=3.5)),
                                  "malformed_annotation", "train.json: 'annotations' must be a list, got float"),
    "coco category name None": ("coco", lambda r: _set_coco(r, lambda d: d["categories"][0].update(name=None)),
                                "malformed_annotation", "categories[0] 'name' must be a non-empty string, got None"),
    "coco category name a list": ("coco", lambda r: _set_coco(r, lambda d: d["categories"][1].update(name=[1])),
                                  "malformed_annotation", "categories[1] 'name' must be a non-empty string, got [1]"),
    "coco class index out of range": ("coco", lambda r: _set_coco(r, lambda d: d["annotations"][0].update(category_id=9)),
                                      "unknown_class", "has unknown category id 9"),
    "coco box outside the image": ("coco", lambda r: _set_coco(r, lambda d: d["annotations"][0].update(bbox=[50, 2, 30, 8])),
                                   "bad_box", "bbox [50, 2, 30, 8] is outside the 64x64 image"),
    "coco duplicate file": ("coco", lambda r: _set_coco(r, lambda d: d["images"].append({**d["images"][0], "id": 999})),
                            "malformed_annotation", "lists file train_"),
    "coco bbox a string": ("coco", lambda r: _set_coco(r, lambda d: d["annotations"][0].update(bbox="1234")),
                           "malformed_annotation", "annotations[0] lacks an integer image_id/category_id or a bbox of 4 numbers"),
    "coco unreadable image": ("coco", lambda r: _first_image(r, "coco").write_bytes(b""), "unreadable_image", ".png: cannot read image"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_dataset_gives_its_one_line(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    fmt, mutate, kind, text = BROKEN[case]
    root = tmp_path / "ds"
    shutil.copytree(exported / fmt / "base", root)
    mutate(root)
    rc, out, err = run(["check-data", str(root / "data.yaml")], capsys)
    line = one_line(err)
    assert rc == 1 and f"error: {kind}: 1" in out and "FAILED: 1 error(s)" in out, out + err
    assert f"first {kind}: " in line and text in line, line


def test_yolo_images_without_label_file_or_with_an_empty_one_are_background(exported: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """As in ultralytics: no label file, or an empty one, means an image without defects; both are kept and counted."""
    root = tmp_path / "ds"
    shutil.copytree(exported / "yolo" / "base", root)
    labels = [t for t in sorted((root / "labels" / "train").glob("*.txt")) if t.read_text().strip()]
    empty = sum(1 for t in (root / "labels").rglob("*.txt") if not t.read_text().strip())  # the export's own backgrounds
    labels[0].unlink()
    labels[1].write_text("")
    rc, out, err = run(["check-data", str(root / "data.yaml")], capsys)
    assert rc == 0 and f"({empty + 2} background, without defects)" in out, out + err


def test_voc_xmls_without_objects_are_background_images_in_training_and_testing(exported: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    from sdidd.config import load_config
    from sdidd.engine.run_data import channel_view, load_run_data
    root = tmp_path / "ds"
    shutil.copytree(exported / "voc" / "base", root)
    xml = _first_label(root, "voc")
    text = xml.read_text()
    xml.write_text(text[:text.index("<object>")] + text[text.rindex("</object>") + len("</object>"):])
    rc, out, err = run(["check-data", str(root / "data.yaml"), "--split", "train"], capsys)
    assert rc == 0 and "background, without defects" in out, out + err
    cfg = load_config(None, [f"data={root / 'data.yaml'}", "data.train_sizes=[64]", "data.test_size=64", "data.max_size=64"])
    data = load_run_data(cfg.data)
    empty = [r for r in data.train.records if len(r.labels) == 0]
    assert empty and len(channel_view(data.train, list(data.classes))) == len(data.train)  # kept for training


def test_yolo_polygons_become_boxes_and_small_overshoots_are_clipped(tmp_path: Path) -> None:
    from sdidd.data.records import Problems
    from sdidd.data.yolo import parse_yolo_txt
    txt = tmp_path / "a.txt"
    txt.write_text("0 0.1 0.2 0.5 0.2 0.4 0.6\r\n1 0.5 0.5 1.02 0.2\r\n")  # a triangle; a box 1 % past both sides (CRLF)
    clipped: list[str] = []
    boxes, labels = parse_yolo_txt(txt, 100, 100, 2, Problems(strict=True), clipped)
    assert labels.tolist() == [0, 1]
    assert boxes[0].tolist() == pytest.approx([10, 20, 50, 60])
    assert boxes[1].tolist() == pytest.approx([0, 40, 100, 60]) and len(clipped) == 1


DESCRIPTION_ERRORS: dict[str, tuple[dict, str]] = {
    "yolo without names": ({"format": "yolo", "train": "images/train"}, "a YOLO description needs 'names'"),
    "unknown format": ({"format": "labelme", "train": "x"}, "format 'labelme' is not supported (coco, voc, yolo)"),
    "empty class name": ({"format": "voc", "train": "x", "names": ["a", " "]}, "'names' must be a list of non-empty class names"),
    "class name a number": ({"format": "coco", "train": "x.json", "names": ["a", 0]}, "'names' must be a list of non-empty class names"),
    "class name twice": ({"format": "yolo", "train": "x", "names": ["a", "a"]}, "'names' lists class 'a' twice"),
    "nc differs": ({"format": "yolo", "train": "x", "names": ["a"], "nc": 2}, "'nc' is 2 but 'names' has 1 classes"),
    "names mapping with gaps": ({"format": "yolo", "train": "x", "names": {0: "a", 2: "b"}}, "needs the keys 0..1"),
    "coco key in voc": ({"format": "voc", "train": "x", "images": "y"}, "'images' is a coco key"),
    # A list of folders is YOLO's (ultralytics reads it; test_ultralytics.py); other formats name one file or folder.
    "train a list": ({"format": "coco", "train": ["a.json", "b.json"]}, "'train' lists images or folders, a YOLO form"),
    "train a list of numbers": ({"format": "yolo", "train": [1, 2], "names": ["a"]}, "'train' must be a path (a string"),
    "no splits": ({"format": "voc", "names": ["a"]}, "neither 'train' nor 'test' (or 'val') is given"),
    "yolo folder missing": ({"format": "yolo", "train": "nowhere", "names": ["a"]}, "nowhere: YOLO image folder not found"),
    "voc split missing": ({"format": "voc", "train": "nowhere"}, "nowhere: VOC split not found"),
}


@pytest.mark.parametrize("case", list(DESCRIPTION_ERRORS))
def test_bad_description_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    desc, text = DESCRIPTION_ERRORS[case]
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(desc))
    rc, _, err = run(["check-data", str(path)], capsys)
    line = one_line(err)
    assert rc == 2 and text in line and ("data.yaml" in line or "nowhere" in line), line


def test_check_data_of_format_names_needs_a_description(capsys: pytest.CaptureFixture) -> None:
    for fmt in ("voc", "yolo"):
        rc, _, err = run(["check-data", fmt], capsys)
        assert rc == 2 and "needs its dataset description" in one_line(err)


# ---------------------------------------------------------------- image size from the data

def test_image_size_from_the_data_rounded_capped_and_warned(capsys: pytest.CaptureFixture) -> None:
    setup_logging()  # sdidd's log lines on stdout, as the CLI prints them
    recs = [Record(i + 1, f"im{i}.png", w, h) for i, (w, h) in enumerate([(500, 300), (520, 310), (900, 330)])]
    cfg = DataConfig(max_size=1024)
    capsys.readouterr()
    train_sizes, test_size, reason = choose_image_size(cfg, recs)
    out = capsys.readouterr().out
    assert test_size == 320 and train_sizes == [320]  # median short side 310 -> stride 32
    assert "from the data" in reason and "image size: short side 320" in out and "warning" not in out

    cfg = DataConfig(max_size=160)  # capped by the recipe's max, and 520 px wide -> 160: below a third
    test_size = choose_image_size(cfg, recs)[1]
    out = capsys.readouterr().out
    assert test_size == 160 and "capped by data.max_size 160" in out
    assert "3 of 3 images shrink below a third" in out and "im2.png: 900x330" in out

    cfg = DataConfig(train_sizes=[96], test_size=128, max_size=200)  # a recipe's sizes stay exactly as given
    assert choose_image_size(cfg, recs) == ([96], 128, "set by the recipe") and cfg.max_size == 200
    cfg = DataConfig(test_size=96)  # one set: the other is the old default
    assert choose_image_size(cfg, [])[:2] == ([160], 96)


def test_packaged_recipes_keep_their_sizes() -> None:
    for name, size in (("neu_det_quick", 160), ("deeppcb_quick", 320), ("synthetic_quick", 160)):
        cfg = load_config(name)
        assert cfg.data.test_size == size and cfg.data.train_sizes == [size] and cfg.data.max_size == size
        before = (list(cfg.data.train_sizes), cfg.data.test_size)
        assert choose_image_size(cfg.data, [Record(1, "x", 640, 640)])[:2] == before


def test_unset_sizes_are_validated_and_one_set_keeps_the_old_check(capsys: pytest.CaptureFixture) -> None:
    assert config_from_dict({}).data.test_size == 0  # from the data
    with pytest.raises(SdiddError, match="data.max_size"):
        config_from_dict({"data": {"test_size": 320}})  # the old default cap (267) still applies when one size is set
    with pytest.raises(SdiddError, match="data.test_size"):
        config_from_dict({"data": {"test_size": 16}})


# ---------------------------------------------------------------- a packaged recipe from outside the checkout

@pytest.mark.slow  # two fresh interpreters importing torch: ~5-12 s
def test_recipe_found_from_the_installed_package_outside_the_checkout(tmp_path: Path) -> None:
    code = ("import sdidd, pathlib; from sdidd.config import load_config, packaged_config; "
            "c = load_config('neu_det_quick', ['train.epochs=2']); "
            "p = packaged_config('synthetic_quick'); "
            "assert not pathlib.Path('configs').exists(); "
            "assert p.is_file() and p.parent.parent == pathlib.Path(sdidd.__file__).parent, p; "
            "print(c.name, c.train.epochs, c.data.test_size)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["neu-det-quick", "2", "160"]
    res = subprocess.run([sys.executable, "-m", "sdidd", "train", "no_such_recipe"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no packaged config 'no_such_recipe' (known:" in res.stderr and "synthetic_quick" in res.stderr


# ---------------------------------------------------------------- eval and predict keep the dataset's ids and names

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init checkpoint of the base classes whose head fires everywhere (something to score)."""
    import torch
    from torch import nn

    from sdidd.config import Config
    from sdidd.engine.build import detector_config
    from sdidd.engine.checkpoint import save_checkpoint
    from sdidd.model import detector as det_mod
    torch.manual_seed(0)
    cfg = replaced(Config(), {"data.test_size": 64, "data.max_size": 64, "data.train_sizes": [64],
                              "model.pretrained": False, "model.fpn_channels": 16, "model.head_channels": 16,
                              "model.head_convs": 1})
    model = det_mod.build_detector(detector_config(cfg, 2))
    with torch.no_grad():
        nn.init.normal_(model.head.gfl_cls.weight, std=0.1)
        model.head.gfl_cls.bias.fill_(-1.0)
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    save_checkpoint({"model": model.state_dict(), "detector": model.cfg.__dict__ | {"num_classes": 2},
                     "classes": ["scratch", "spot"], "new_classes": ["scratch", "spot"], "step": 0, "method": "joint",
                     "config": cfg.to_dict(), "epoch": 1, "iteration": 1}, path)
    return path


def _renumbered_coco(exported: Path, tmp_path: Path) -> Path:
    """The coco base dataset with the user's own ids: images 1000 + 7k, categories spot = 3, scratch = 8."""
    root = tmp_path / "own_ids"
    shutil.copytree(exported / "coco" / "base", root)
    path = root / "annotations" / "test.json"
    doc = json.loads(path.read_text())
    ids = {im["id"]: 1000 + 7 * k for k, im in enumerate(doc["images"])}
    for im in doc["images"]:
        im["id"] = ids[im["id"]]
    cats = {1: 8, 2: 3}  # scratch, spot
    doc["categories"] = [{"id": 3, "name": "spot"}, {"id": 8, "name": "scratch"}]
    for a in doc["annotations"]:
        a["image_id"], a["category_id"] = ids[a["image_id"]], cats[a["category_id"]]
    path.write_text(json.dumps(doc))
    desc = yaml.safe_load((root / "data.yaml").read_text())
    del desc["names"], desc["train"], desc["train_images"]  # a test set only; class order now by category id
    (root / "data.yaml").write_text(yaml.safe_dump(desc))
    return root


@pytest.mark.slow  # eval draws its figures: ~10 s on 2 cores
def test_eval_with_a_description_writes_coco_results_in_the_users_ids(exported: Path, ckpt: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from pycocotools.coco import COCO
    root = _renumbered_coco(exported, tmp_path)
    out = tmp_path / "ev" / "eval.json"
    rc, text, err = run(["eval", str(ckpt), f"data={root / 'data.yaml'}", "train.device=cpu", "train.workers=0",
                         "--out", str(out)], capsys)
    assert rc == 0, err
    results = json.loads((tmp_path / "ev" / "eval_detections.json").read_text())
    gt = json.loads((root / "annotations" / "test.json").read_text())
    assert results and {r["image_id"] for r in results} <= {im["id"] for im in gt["images"]}
    assert {r["category_id"] for r in results} <= {3, 8}
    assert all(r["file_name"].startswith("images/test/") for r in results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "test.json"))
        coco.loadRes(str(tmp_path / "ev" / "eval_detections.json"))  # what another tool does with it
    assert "eval_detections.json (COCO results)" in text

    rc, _, err = run(["eval", str(ckpt), f"data={root / 'data.yaml'}", "model.fpn_channels=8"], capsys)
    assert rc == 2 and "override 'model...': eval uses the checkpoint's model" in one_line(err)


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_predict_on_a_description_keeps_ids_and_file_names(exported: Path, ckpt: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture, fmt: str) -> None:
    root = _renumbered_coco(exported, tmp_path) if fmt == "coco" else exported / "yolo" / "base"
    out = tmp_path / "pred"
    rc, _, err = run(["predict", str(ckpt), f"data={root / 'data.yaml'}", "train.device=cpu", "data.test_size=64",
                      "--out", str(out), "--score", "0.05"], capsys)
    assert rc == 0, err
    doc = json.loads((out / "predictions.json").read_text())
    bare = json.loads((out / "results.json").read_text())
    assert bare == doc["detections"] and bare
    names = sorted(p.name for p in (root / "images" / "test").glob("*.png"))
    assert sorted(Path(im["file_name"]).name for im in doc["images"]) == names
    assert all(im["file_name"].startswith("images/test/") and (out / im["file_name"]).is_file() for im in doc["images"])
    if fmt == "coco":  # the json's own image and category ids
        gt = json.loads((root / "annotations" / "test.json").read_text())
        by_name = {im["file_name"]: im["id"] for im in gt["images"]}
        assert all(by_name[Path(im["file_name"]).name] == im["id"] for im in doc["images"])
        assert {c["id"] for c in doc["categories"]} == {3, 8} and {d["category_id"] for d in bare} <= {3, 8}
    else:
        assert [im["id"] for im in doc["images"]] == list(range(1, len(names) + 1))

    rc, _, err = run(["predict", str(ckpt), f"data={root / 'data.yaml'}", "model.head_convs=3"], capsys)
    assert rc == 2 and "predict takes data=FILE" in one_line(err)
    rc, _, err = run(["predict", str(ckpt), str(root), f"data={root / 'data.yaml'}"], capsys)
    assert rc == 2 and "not both" in one_line(err)


# ---------------------------------------------------------------- training from a YOLO description, size from the data

@pytest.mark.slow  # one tiny epoch: ~10 s on 2 cores
def test_train_from_a_yolo_description_takes_the_size_from_the_data(exported: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "recipe.yaml"  # no image size: it comes from the data (64 px exports)
    recipe.write_text(yaml.safe_dump({
        "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
        "train": {"epochs": 1, "min_iters": 0, "batch_size": 4, "workers": 0, "threads": 1, "device": "cpu",
                  "progress": False, "warmup_iters": 2, "milestones": [2]}}))
    rc, out, err = run(["train", str(recipe), f"data={exported / 'yolo' / 'base' / 'data.yaml'}",
                        f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert rc == 0, err
    assert "image size: short side 64 (training 64), long side <= 267 (from the data: median image side 64" in out
    from sdidd.engine.checkpoint import load_checkpoint
    state = load_checkpoint(tmp_path / "run" / "last.pth")
    assert state["classes"] == ["scratch", "spot"] and state["config"]["data"]["test_size"] == 64
    rc, out, err = run(["eval", str(tmp_path / "run" / "last.pth"), f"data={exported / 'voc' / 'base' / 'data.yaml'}",
                        "--out", str(tmp_path / "ev.json")], capsys)
    assert rc == 0 and "AP50" in out, err
