"""sdidd+ old-class pseudo-labels: per-class thresholds from the teacher's own scores, overlap with new GT dropped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sdidd.engine.pseudo_labels as pl
from sdidd.config import config_from_dict, replaced
from sdidd.methods import METHODS as method_table, resolved_distill
from sdidd.data import DetectionDataset, Record
from sdidd.engine.build import StepSpec, build_step, detector_config
from sdidd.engine.run_data import load_run_data
from sdidd.model.detector import build_detector
from test_cli_errors import TINY

torch.set_num_threads(1)


def _dets(boxes, scores, labels) -> dict:
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels, np.int64)}


def test_thresholds_are_mean_plus_k_std_of_each_old_class_scores() -> None:
    dets = {1: _dets([[0, 0, 1, 1]] * 3, [0.1, 0.2, 0.3], [0, 0, 0]), 2: _dets([[0, 0, 1, 1]] * 2, [0.5, 0.7], [1, 1]),
            3: _dets([[0, 0, 1, 1]], [0.9], [2])}
    thr = pl.score_thresholds(dets, num_old=3, sigmas=2.0)
    assert thr[0] == pytest.approx(0.2 + 2 * np.std([0.1, 0.2, 0.3]))
    assert thr[1] == pytest.approx(0.6 + 2 * 0.1)
    assert np.isinf(thr[2])  # one detection: no statistics, no pseudo-label


def test_a_confident_teacher_detection_becomes_an_old_target_unless_it_overlaps_a_new_box() -> None:
    # Channels: 0, 1 old (the teacher's), 2, 3 new; the image holds one new-class GT box (channel 2).
    rec = Record(image_id=7, file="x.png", width=100, height=100, boxes=np.array([[50, 50, 90, 90]], np.float32),
                 labels=np.array([2]))
    ds = DetectionDataset(["a", "b", "c", "d"], [rec])
    dets = {7: _dets([[5, 5, 30, 30], [52, 52, 88, 88], [60, 5, 95, 30]], [0.9, 0.95, 0.2], [0, 1, 0])}
    out, stats = pl.add_pseudo_labels(ds, dets, thresholds=np.array([0.5, 0.5]), overlap_iou=0.5)
    r = out.records[0]
    assert r.labels.tolist() == [2, 0]  # the GT, then the kept detection in its old channel
    assert r.boxes.tolist()[1] == [5, 5, 30, 30]
    assert stats["pseudo_boxes"] == 1 and stats["per_class"] == [1, 0] and stats["pseudo_images"] == 1
    assert ds.records[0].labels.tolist() == [2]  # the input dataset is untouched


def test_a_lower_overlap_iou_drops_a_detection_that_covers_part_of_a_new_defect() -> None:
    # The teacher calls the left third of a new defect an old class: IoU 1/3 with the new box.
    rec = Record(image_id=1, file="x.png", width=100, height=100, boxes=np.array([[10, 10, 70, 40]], np.float32),
                 labels=np.array([2]))
    ds = DetectionDataset(["a", "b", "c"], [rec])
    dets = {1: _dets([[10, 10, 30, 40], [80, 80, 95, 95]], [0.9, 0.9], [0, 1])}
    kept = pl.add_pseudo_labels(ds, dets, thresholds=np.array([0.5, 0.5]), overlap_iou=0.5)[0].records[0]
    assert kept.labels.tolist() == [2, 0, 1]  # at 0.5 the partial box stays, as an old-class target on the new defect
    sdidd_plus_iou = method_table["sdidd+-iou0.1"].distill["pseudo_overlap_iou"]
    dropped = pl.add_pseudo_labels(ds, dets, thresholds=np.array([0.5, 0.5]), overlap_iou=sdidd_plus_iou)[0].records[0]
    assert dropped.labels.tolist() == [2, 1]  # the benchmark variant drops it, the far one stays


def test_sdidd_plus_step_trains_every_channel_on_gt_plus_pseudo_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({**TINY, "data": {**TINY["data"], "dataset": "synthetic", "num_train_images": 8, "num_test_images": 2},
                            "incremental": {"method": "sdidd+"}})
    assert resolved_distill(cfg, "sdidd+").pseudo_labels and not resolved_distill(cfg, "sdidd").pseudo_labels
    data = load_run_data(cfg.data)
    old, new = data.classes[:2], data.classes[2:]
    teacher = build_detector(detector_config(cfg, 2))
    first = next(r for r in data.train.records if np.isin(r.labels, [2, 3]).any())
    fake = {first.image_id: _dets([[1, 1, 9, 9], [2, 2, 8, 8]], [0.9, 0.3], [1, 1])}  # mean 0.6 + 0.2 std-> thr 0.6 (k=1)
    monkeypatch.setattr(pl, "teacher_detections", lambda *a, **k: fake)
    cfg = replaced(cfg, {"distill.pseudo_sigmas": 1.0})
    step = build_step(cfg, StepSpec(old + new, new, "sdidd+", 1), data, tmp_path, teacher)
    assert step.trained.all()
    got = next(r for r in step.loader.dataset.records if r.image_id == first.image_id)
    assert got.labels.tolist()[-1] == 1 and got.boxes.tolist()[-1] == [1, 1, 9, 9]
    assert step.stats["pseudo_boxes"] == 1
    plain = build_step(cfg, StepSpec(old + new, new, "sdidd", 1), data, tmp_path / "plain", teacher)
    assert plain.trained.tolist() == [False, False, True, True] and "pseudo_boxes" not in plain.stats


def test_a_pseudo_label_must_score_above_what_the_teacher_gives_new_class_objects() -> None:
    # Channels 0, 1 old, 2 new. The teacher calls the new-class GT box class 0 at 0.6: a class-0 detection
    # elsewhere at 0.5 is then as likely a confusion as an old defect and is dropped; one at 0.7 is kept.
    rec = Record(image_id=1, file="x.png", width=100, height=100, boxes=np.array([[50, 50, 90, 90]], np.float32),
                 labels=np.array([2]))
    ds = DetectionDataset(["a", "b", "c"], [rec])
    dets = {1: _dets([[51, 51, 89, 89], [5, 5, 30, 30], [5, 60, 30, 90], [60, 5, 90, 30]], [0.6, 0.5, 0.7, 0.1], [0, 0, 0, 0])}
    ceil = pl.negative_ceilings(ds, dets, num_old=2, overlap_iou=0.5)
    assert ceil.tolist() == pytest.approx([0.6, 0.0])
    alone = pl.score_thresholds(dets, num_old=2, sigmas=0.0)
    assert alone[0] == pytest.approx(0.475)  # the mean alone would keep the 0.5 detection
    thr = pl.score_thresholds(dets, num_old=2, sigmas=0.0, ceilings=ceil)
    assert thr[0] == pytest.approx(0.6) and np.isinf(thr[1])  # raised to the ceiling; class 1: no scores
    out, stats = pl.add_pseudo_labels(ds, dets, thr, overlap_iou=0.5)
    assert out.records[0].boxes.tolist()[1:] == [[5, 60, 30, 90]] and stats["pseudo_boxes"] == 1


def test_labelled_old_classes_get_no_pseudo_labels_and_do_not_set_the_negative_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the old class a labelled in the image (channel 0), the teacher's confident a-detection is not added again,
    and the teacher's b-score on that a-box does not count as a score 'on a new-class object'."""
    rec = Record(image_id=7, file="x.png", width=100, height=100,
                 boxes=np.array([[5, 5, 30, 30], [50, 50, 90, 90]], np.float32), labels=np.array([0, 2]))
    ds = DetectionDataset(["a", "b", "c", "d"], [rec])
    dets = {7: _dets([[6, 6, 30, 30], [5, 5, 29, 31], [60, 5, 95, 30]] * 2, [0.9, 0.8, 0.95, 0.1, 0.2, 0.3], [0, 1, 0, 0, 1, 0])}
    assert pl.negative_ceilings(ds, dets, num_old=2, overlap_iou=0.5).tolist() == [0.0, 0.0]  # the only GT is new: none
    monkeypatch.setattr(pl, "teacher_detections", lambda *a, **k: dets)
    teacher = type("T", (), {"cfg": type("C", (), {"num_classes": 2})()})()
    out, stats = pl.pseudo_labelled(ds, teacher, None, torch.device("cpu"), sigmas=0.0, overlap_iou=0.5, labelled=[0])
    added = out.records[0].labels[2:].tolist()
    assert 0 not in added and stats["per_class"][0] == 0


def test_old_labels_keep_the_old_boxes_and_train_their_channels(tmp_path: Path) -> None:
    from sdidd.engine.protocol import step_specs
    spec = step_specs([["scratch", "spot"], ["patch", "crack"]], "sdidd", old_labels=True)[1]
    assert spec.labelled_old == ["scratch", "spot"] and spec.num_old == 2
    assert step_specs([["scratch", "spot"], ["patch", "crack"]], "sdidd")[1].labelled_old == []
    cfg = config_from_dict({**TINY, "data": {**TINY["data"], "dataset": "synthetic", "num_train_images": 8,
                                             "num_test_images": 4},
                            "train": {**TINY["train"], "out_dir": str(tmp_path / "s")}})
    data = load_run_data(cfg.data)
    teacher = build_detector(detector_config(cfg, 2))
    step = build_step(cfg, spec, data, tmp_path / "s", teacher)
    assert step.trained.tolist() == [True, True, True, True]
    labels = np.concatenate([r.labels for r in step.loader.dataset.records])
    assert (labels < 2).any() and (labels >= 2).any()  # old boxes kept beside the new ones
