"""A dataset as ultralytics users have it: their data.yaml as it is (no `format`, `nc`, names as a dict, Roboflow keys,
`../` paths), polygons, images without label files, CRLF line ends and upper-case suffixes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdidd.data.description import load_description
from test_cli_errors import error_line
from test_cli_errors import run_cli as run

torch.set_num_threads(1)


def make_roboflow_export(root: Path, n_train: int = 6, n_val: int = 3) -> Path:
    """A Roboflow-style YOLO export: data.yaml in the root with '../train/images' paths; returns the yaml."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            img[10:30, 10:40] = 230
            Image.fromarray(img).save(root / split / "images" / f"img_{i}.JPG")
            if i == 0:
                continue  # no label file: a background image
            lines = ["0 0.390625 0.3125 0.46875 0.3125"]  # the bright patch
            if i % 2:
                lines.append("1 0.7 0.7 0.8 0.7 0.75 0.9")  # a polygon (segmentation label)
            (root / split / "labels" / f"img_{i}.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    desc = {"train": "../train/images", "val": "../valid/images", "nc": 2, "names": {0: "stain", 1: "hole"},
            "roboflow": {"workspace": "w", "project": "p", "version": 1, "license": "CC BY 4.0",
                         "url": "https://example.invalid/p/1"}}
    (root / "data.yaml").write_text(yaml.safe_dump(desc))
    return root / "data.yaml"


def test_an_ultralytics_data_yaml_is_read_as_yolo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = make_roboflow_export(tmp_path / "export")
    section = load_description(path)
    assert section["dataset"] == "yolo" and section["names"] == ["stain", "hole"]
    assert section["train_path"] == str((tmp_path / "export" / "train" / "images").resolve())
    rc, out, err = run(["check-data", str(path)], capsys)
    assert rc == 0, out + err
    assert "9 images (2 background, without defects)" in out and "stain 7, hole 4" in out, out


def test_a_description_whose_format_cannot_be_told_says_how_to_set_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"train": "stuff", "names": ["a"]}))
    rc, _, err = run(["check-data", str(tmp_path / "data.yaml")], capsys)
    line = error_line(err)
    assert rc == 2 and "no 'format' key" in line and "add format: coco, voc or yolo" in line


@pytest.mark.slow
def test_training_runs_on_an_ultralytics_export_as_it_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = make_roboflow_export(tmp_path / "export")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"train_sizes": [64], "test_size": 64, "max_size": 64},
        "model": {"pretrained": False, "fpn_channels": 16, "head_channels": 16, "head_convs": 1},
        "train": {"epochs": 2, "min_iters": 0, "batch_size": 4, "workers": 0, "threads": 1, "device": "cpu",
                  "progress": False, "warmup_iters": 2, "milestones": [2]}}))
    rc, out, err = run(["train", str(recipe), f"data={path}", f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert rc == 0, err
    run_dir = tmp_path / "run"
    assert (run_dir / "last.pth").is_file() and "stain" in out and "hole" in out
    # No test split: every evaluation reads val, said so; an epoch-by-epoch record and a best.pth chosen there.
    assert "last epoch, val split (the dataset has no test split)" in out
    assert "epoch 1: mAP50" in out and "on the val split" in out
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert rows[0] == "epoch,iteration,split,map50,map" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert (run_dir / "best.pth").is_file() and (run_dir / "losses.png").is_file() and (run_dir / "results.png").is_file()
    assert str(run_dir / "last.pth") in out
    rc, _, err = run(["eval", str(run_dir / "last.pth"), f"data={path}", "--split", "bogus"], capsys)
    assert rc == 2 and "split 'bogus': not a split of this dataset (it has train, val)" in error_line(err)
    rc, out, err = run(["eval", str(run_dir / "last.pth"), f"data={path}", "--split", "val"], capsys)
    assert rc == 0, err


def test_ultralytics_habits_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sdidd.config import load_config
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"max_size": 320}}))
    assert load_config(recipe, ["data.train_sizes=320", "data.test_size=320"]).data.train_sizes == [320]  # a scalar is one size
    for arg, hint in (("imgsz=320", "data.train_sizes and data.test_size"), ("batch=16", "train.batch_size"),
                      ("epochs=5", "train.epochs")):
        rc, _, err = run(["train", str(recipe), arg], capsys)
        assert rc == 2 and hint in error_line(err), (arg, err)
    if not torch.cuda.is_available():  # the device is checked before any data is read
        rc, _, err = run(["train", str(recipe), "--device", "cuda", "data.root=/nonexistent"], capsys)
        assert rc == 2 and "CUDA is not available" in error_line(err)


def test_train_with_only_a_data_yaml_uses_the_recipe_for_ones_own_defects(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = make_roboflow_export(tmp_path / "export")
    rc, out, err = run(["train", f"data={path}", "train.epochs=1", "train.min_iters=0", "train.threads=1",
                        "model.pretrained=false", "model.fpn_channels=16", "model.head_channels=16", "model.head_convs=1",
                        "train.milestones=[1]", "train.progress=false", f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert rc == 0, err
    assert "short side 64" in out and "from the data" in out  # the recipe's sizes come from the images
    cfg = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["name"] == "defects" and cfg["model"]["backbone"] == "tf_efficientnet_lite0"
    rc, _, err = run(["train", "nope.yaml"], capsys)
    assert rc == 2 and "packaged recipes: " in error_line(err) and "defects" in error_line(err)


def test_splits_as_lists_of_folders_and_txt_image_lists(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "export"
    make_roboflow_export(root)
    listed = sorted((root / "valid" / "images").glob("*.JPG"))
    (root / "valid.txt").write_text("\n".join(f"./valid/images/{p.name}" for p in listed) + "\n")
    (root / "lists.yaml").write_text(yaml.safe_dump({"train": ["train/images", "valid/images"], "val": "valid.txt",
                                                     "names": ["stain", "hole"]}))
    section = load_description(root / "lists.yaml")
    assert section["dataset"] == "yolo" and len(section["train_path"]) == 2
    rc, out, err = run(["check-data", str(root / "lists.yaml"), "--split", "train"], capsys)
    assert rc == 0 and "9 images" in out, out + err
    rc, out, err = run(["check-data", str(root / "lists.yaml"), "--split", "val"], capsys)
    assert rc == 0 and "3 images (1 background, without defects)" in out, out + err
    (root / "coco.yaml").write_text(yaml.safe_dump({"format": "coco", "train": ["a.json", "b.json"]}))
    rc, _, err = run(["check-data", str(root / "coco.yaml")], capsys)
    assert rc == 2 and "a YOLO form" in error_line(err)
