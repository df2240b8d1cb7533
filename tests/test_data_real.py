"""Loader tests on the real NEU-DET and DeepPCB data (skipped when the data root is absent)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sdidd.data import DetectionDataset, build_dataset
from sdidd.engine.run_data import channel_view

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SDIDD_DATA") or REPO_ROOT.parent / "shared" / "data")

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not (DATA_ROOT / "NEU-DET").is_dir() or not (DATA_ROOT / "DeepPCB").is_dir(),
        reason=f"real data not found at {DATA_ROOT} (set SDIDD_DATA to a folder holding NEU-DET/ and DeepPCB/)",
    ),
]

NEU_COUNTS = {"crazing": 689, "inclusion": 1011, "patches": 881, "pitted_surface": 432,
              "rolled-in_scale": 628, "scratches": 548}
PCB_COUNTS = {"open": 1942, "short": 1506, "mousebite": 1965, "spur": 1625, "copper": 1474, "pin-hole": 1501}


@pytest.fixture(scope="module")
def neu() -> dict[str, DetectionDataset]:
    return {s: build_dataset("neu-det", s, root=DATA_ROOT) for s in ("train", "test", "all")}


@pytest.fixture(scope="module")
def pcb() -> dict[str, DetectionDataset]:
    return {s: build_dataset("deeppcb", s, root=DATA_ROOT) for s in ("trainval", "test")}


def test_neu_det_counts_and_split(neu: dict[str, DetectionDataset]) -> None:
    all_, train, test = neu["all"], neu["train"], neu["test"]
    assert all_.classes == list(NEU_COUNTS)
    assert len(all_) == 1800 and all_.num_boxes == 4189
    assert all_.class_counts() == NEU_COUNTS
    assert len(train) == 1440 and len(test) == 360
    assert train.num_boxes + test.num_boxes == 4189
    assert {r.image_id for r in train.records}.isdisjoint(r.image_id for r in test.records)
    assert sorted(r.image_id for r in all_.records) == list(range(1, 1801))
    per_file_class = Counter(Path(r.file).stem.rsplit("_", 1)[0] for r in test.records)
    assert set(per_file_class.values()) == {60}
    assert all(int(Path(r.file).stem.rsplit("_", 1)[1]) % 5 == 0 for r in test.records)
    nboxes = [len(r.labels) for r in all_.records]
    assert min(nboxes) == 1 and max(nboxes) == 9
    # labels come from <name>: some files hold boxes of another class than their name
    mixed = sum(
        any(all_.classes[l] != Path(r.file).stem.rsplit("_", 1)[0] for l in r.labels.tolist()) for r in all_.records
    )
    assert mixed == 123
    for r in all_.records:
        assert (r.boxes[:, :2] >= 0).all() and (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 3] <= r.height).all()


def test_neu_det_image(neu: dict[str, DetectionDataset]) -> None:
    img, t = neu["test"][0]
    assert img.shape == (3, 200, 200) and img.dtype == torch.uint8
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["image_id"] == neu["test"].records[0].image_id


def test_neu_det_new_class_subset(neu: dict[str, DetectionDataset]) -> None:
    train = neu["train"]
    new = channel_view(train, list(train.classes), keep=["pitted_surface", "rolled-in_scale", "scratches"])
    labels = np.concatenate([r.labels for r in new.records])
    assert set(labels.tolist()) == {3, 4, 5}
    expected_boxes = sum(int(np.isin(r.labels, [3, 4, 5]).sum()) for r in train.records)
    expected_images = sum(bool(np.isin(r.labels, [3, 4, 5]).any()) for r in train.records)
    assert new.num_boxes == expected_boxes == len(labels)
    assert len(new) == expected_images and expected_images < len(train)
    # old-class boxes inside those images are dropped, not relabelled
    assert any(np.isin(r.labels, [0, 1, 2]).any() for r in train.records if np.isin(r.labels, [3, 4, 5]).any())


def test_deeppcb_counts_and_split(pcb: dict[str, DetectionDataset]) -> None:
    tv, te = pcb["trainval"], pcb["test"]
    assert len(tv) == 1000 and len(te) == 500
    counts = {c: tv.class_counts()[c] + te.class_counts()[c] for c in tv.classes}
    assert counts == PCB_COUNTS and tv.num_boxes + te.num_boxes == 10013
    ids = [r.image_id for r in tv.records] + [r.image_id for r in te.records]
    assert sorted(ids) == list(range(1, 1501))
    assert all(r.file.endswith("_test.jpg") and (r.width, r.height) == (640, 640) for r in tv.records + te.records)
    nboxes = [len(r.labels) for r in tv.records + te.records]
    assert min(nboxes) == 1 and max(nboxes) == 15
    img, t = te[0]
    assert img.shape == (3, 640, 640) and img.dtype == torch.uint8
