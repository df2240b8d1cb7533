"""check_dataset: every injected problem is reported (and none stops the check); real NEU-DET passes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdidd.data.check import check_dataset
from sdidd.errors import SdiddError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SDIDD_DATA") or REPO_ROOT.parent / "shared" / "data")


def _xml(objs: list[tuple[str, tuple[int, int, int, int]]], size: int = 32) -> str:
    o = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objs
    )
    return f"<annotation><size><width>{size}</width><height>{size}</height></size>{o}</annotation>"


def _neu(root: Path, n: int = 8) -> Path:
    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / "IMAGES" / f"crazing_{i}.jpg")
        (root / "ANNOTATIONS" / f"crazing_{i}.xml").write_text(_xml([("crazing", (2, 2, 20, 20))]))
    return root


def test_clean_copy_is_ok(tmp_path: Path) -> None:
    rep = check_dataset(_neu(tmp_path / "NEU-DET"))
    assert rep.ok and rep.num_images == 8 and rep.num_boxes == 8
    assert sum(rep.counts.values()) == 0 and "OK: 0 error(s), 0 warning(s)" in rep.format()


def test_injected_problems_are_all_reported(tmp_path: Path) -> None:
    root = _neu(tmp_path / "NEU-DET", n=10)
    img, ann = root / "IMAGES", root / "ANNOTATIONS"
    data = (img / "crazing_1.jpg").read_bytes()
    (img / "crazing_1.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (img / "crazing_2.jpg").write_bytes(b"garbage")  # unreadable
    (ann / "crazing_3.xml").write_text("<annotation><size>")  # malformed
    (ann / "crazing_4.xml").write_text(_xml([("crazing", (2, 2, 40, 20)), ("crazing", (9, 9, 5, 20))]))
    (ann / "crazing_5.xml").write_text(_xml([("dent", (2, 2, 20, 20))]))
    (img / "crazing_6.jpg").unlink()  # annotation without image
    (img / "crazing_7.jpg").write_bytes((img / "crazing_8.jpg").read_bytes())  # duplicate
    (ann / "crazing_9.xml").write_text(_xml([("crazing", (2, 2, 20, 20))], size=64))  # size mismatch
    Image.new("L", (32, 32), 99).save(img / "crazing_11.jpg")  # image without annotation

    rep = check_dataset(root)
    c = rep.counts
    assert c["unreadable_image"] == 2
    assert c["malformed_annotation"] == 1
    assert c["bad_box"] == 2  # outside + non-positive, both in one file: the check goes on
    assert c["unknown_class"] == 1
    assert c["missing_image"] == 1
    assert c["missing_annotation"] == 1
    assert c["duplicate_image"] == 1
    assert c["size_mismatch"] == 1
    assert not rep.ok and set(rep.warnings) == {"duplicate_image"}
    ex = rep.examples
    assert any("crazing_1.jpg" in e for e in ex["unreadable_image"])
    assert any("crazing_2.jpg" in e for e in ex["unreadable_image"])
    assert "crazing_3.xml" in ex["malformed_annotation"][0]
    assert all("crazing_4.xml" in e for e in ex["bad_box"])
    assert "'dent'" in ex["unknown_class"][0]
    assert "crazing_6" in ex["missing_image"][0] and "crazing_11" in ex["missing_annotation"][0]
    assert "crazing_8.jpg" in ex["duplicate_image"][0] and "crazing_7.jpg" in ex["duplicate_image"][0]
    assert "32x32 but the annotation says 64x64" in ex["size_mismatch"][0]
    text = rep.format()
    assert "FAILED" in text and "error: bad_box: 2" in text and "warning: duplicate_image: 1" in text


def test_examples_are_capped_at_five(tmp_path: Path) -> None:
    root = _neu(tmp_path / "n", n=8)
    for i in range(1, 8):
        (root / "ANNOTATIONS" / f"crazing_{i}.xml").write_text("<oops")
    rep = check_dataset(root)
    assert rep.counts["malformed_annotation"] == 7 and len(rep.examples["malformed_annotation"]) == 5
    assert "(2 more)" in rep.format() and rep.num_images == 1


def test_deeppcb_problems(tmp_path: Path) -> None:
    g = tmp_path / "DeepPCB" / "PCBData" / "group00001"
    (g / "00001").mkdir(parents=True)
    (g / "00001_not").mkdir()
    lines = []
    for k, text in enumerate(["1 1 9 9 1\n1 1 x 9 2\n", "1 1 9 9 7\n", "1 1 9 9 2\n"]):
        pid = f"0000100{k}"
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(g / "00001" / f"{pid}_test.jpg")
        (g / "00001_not" / f"{pid}.txt").write_text(text)
        lines.append(f"group00001/00001/{pid}.jpg group00001/00001_not/{pid}.txt")
    lines.append("group00001/00001/00001009.jpg group00001/00001_not/00001009.txt")  # not on disk
    (tmp_path / "DeepPCB" / "PCBData" / "trainval.txt").write_text("\n".join(lines))
    (tmp_path / "DeepPCB" / "PCBData" / "test.txt").write_text("")
    rep = check_dataset(tmp_path / "DeepPCB")
    assert rep.dataset == "deeppcb"
    assert rep.counts["malformed_annotation"] == 1 and "00001000.txt:2" in rep.examples["malformed_annotation"][0]
    assert rep.counts["unknown_class"] == 1 and rep.counts["missing_image"] == 1
    assert "00001009_test.jpg" in rep.examples["missing_image"][0]
    assert rep.counts["duplicate_image"] == 2  # three identical black images
    assert not rep.ok and rep.num_images == 3 and rep.num_boxes == 2


def test_coco_and_bad_inputs(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
                      {"id": 2, "file_name": "gone.png", "width": 30, "height": 20}],
           "categories": [{"id": 1, "name": "x"}],
           "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 50, 5]},
                           {"image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    rep = check_dataset(tmp_path / "ann.json")
    assert rep.dataset == "coco" and rep.counts["bad_box"] == 1 and rep.counts["unknown_class"] == 1
    assert rep.counts["missing_image"] == 1 and rep.num_images == 1
    with pytest.raises(SdiddError, match="cannot tell the dataset format"):
        check_dataset(tmp_path)
    with pytest.raises(SdiddError, match="NEU-DET not found"):
        check_dataset("neu-det", root=tmp_path / "none")


def test_synthetic_passes() -> None:
    rep = check_dataset("synthetic", split="test")
    assert rep.ok and rep.num_images == 80 and rep.num_boxes > 80


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA_ROOT / "NEU-DET").is_dir(), reason=f"NEU-DET not found under {DATA_ROOT}")
def test_real_neu_det_ok_with_duplicate_warning() -> None:
    rep = check_dataset("neu-det", root=DATA_ROOT)
    assert rep.ok, rep.format()
    assert rep.num_images == 1800 and rep.num_boxes == 4189
    assert rep.errors == {} and rep.warnings == {"duplicate_image": 1}
    ex = rep.examples["duplicate_image"][0]
    assert "patches_101.jpg" in ex and "patches_105.jpg" in ex
