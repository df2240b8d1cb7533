"""COCO evaluation wrapper: perfect / missed / false-positive cases, groups, empty input, class restriction."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sdidd.evaluate import EvalResult, evaluate_detections, format_table, result_to_dict, save_result_json

CLASSES = ["a", "b", "c"]


@dataclass
class Rec:
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


def _records() -> list[Rec]:
    """4 images; class a: 4 boxes, b: 2 boxes, c: 2 boxes."""
    recs = []
    for i in range(4):
        boxes = [[10, 10, 50, 60]]
        labels = [0]
        if i % 2 == 0:
            boxes.append([60, 20, 120, 90])
            labels.append(1)
        else:
            boxes.append([5, 70, 40, 110])
            labels.append(2)
        recs.append(Rec(i + 1, 128, 128, np.array(boxes, np.float32), np.array(labels, np.int64)))
    return recs


def _perfect(recs: list[Rec]) -> dict[int, dict]:
    return {r.image_id: {"boxes": r.boxes.copy(), "scores": np.full(len(r.boxes), 0.9, np.float32),
                         "labels": r.labels.copy()} for r in recs}


def test_perfect_detections_score_100() -> None:
    recs = _records()
    res = evaluate_detections(recs, CLASSES, _perfect(recs))
    for c in CLASSES:
        assert res.per_class[c]["ap50"] == pytest.approx(100.0)
        assert res.per_class[c]["ap"] == pytest.approx(100.0)
    assert res.map50 == pytest.approx(100.0) and res.map == pytest.approx(100.0)
    assert res.groups == {"all": pytest.approx(100.0)}
    assert res.num_gt == {"a": 4, "b": 2, "c": 2}


def test_tensor_inputs_work() -> None:
    recs = _records()
    dets = {k: {kk: torch.as_tensor(v) for kk, v in d.items()} for k, d in _perfect(recs).items()}
    assert evaluate_detections(recs, CLASSES, dets).map50 == pytest.approx(100.0)


def test_missed_box_lowers_only_its_class() -> None:
    recs = _records()
    dets = _perfect(recs)
    d = dets[1]  # drop image 1's class-b box
    keep = d["labels"] != 1
    dets[1] = {k: v[keep] for k, v in d.items()}
    res = evaluate_detections(recs, CLASSES, dets)
    assert res.per_class["b"]["ap50"] == pytest.approx(50.0, abs=1.0)  # recall 0.5 at precision 1
    assert res.per_class["a"]["ap50"] == pytest.approx(100.0)
    assert res.per_class["c"]["ap50"] == pytest.approx(100.0)


def test_confident_false_positive_lowers_ap() -> None:
    recs = _records()
    dets = _perfect(recs)
    d = dets[2]  # a class-a box far from any GT, scored above the true positives
    dets[2] = {"boxes": np.vstack([d["boxes"], [[80, 100, 120, 125]]]), "scores": np.append(d["scores"], 0.99),
               "labels": np.append(d["labels"], 0)}
    res = evaluate_detections(recs, CLASSES, dets)
    assert res.per_class["a"]["ap50"] < 99.0
    assert res.per_class["b"]["ap50"] == pytest.approx(100.0)
    # The same false positive scored below every true positive costs nothing.
    dets[2]["scores"][-1] = 0.1
    assert evaluate_detections(recs, CLASSES, dets).per_class["a"]["ap50"] == pytest.approx(100.0)


def test_groups_average_per_class_ap50() -> None:
    recs = _records()
    dets = _perfect(recs)
    for i in (1, 3):  # drop all class-b boxes -> AP50(b) = 0
        dets[i] = {k: v[dets[i]["labels"] != 1] for k, v in dets[i].items()}
    res = evaluate_detections(recs, CLASSES, dets, groups={"old": [0, 1], "new": [2]})
    assert res.per_class["b"]["ap50"] == pytest.approx(0.0)
    assert res.groups["old"] == pytest.approx(50.0)
    assert res.groups["new"] == pytest.approx(100.0)
    assert res.groups["all"] == pytest.approx(200.0 / 3) == pytest.approx(res.map50)
    table = format_table(res)
    assert "mAP50 old" in table and "mAP50 new" in table and "66.7" in table
    assert all(c in table for c in CLASSES)


def test_empty_detections_give_zero() -> None:
    recs = _records()
    res = evaluate_detections(recs, CLASSES, {})
    assert all(v["ap50"] == 0.0 and v["ap"] == 0.0 for v in res.per_class.values())
    assert res.map50 == 0.0
    empty = {r.image_id: {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)} for r in recs}
    assert evaluate_detections(recs, CLASSES, empty).map == 0.0
    # Some images without any detection: the others still count.
    part = _perfect(recs)
    part[2] = empty[2]
    res = evaluate_detections(recs, CLASSES, part)
    assert 0 < res.per_class["a"]["ap50"] < 100 and res.per_class["b"]["ap50"] == pytest.approx(100.0)


def test_class_ids_restrict_evaluation() -> None:
    recs = _records()
    dets = _perfect(recs)
    for i in (1, 3):  # class b badly missed, but it is not evaluated
        dets[i] = {k: v[dets[i]["labels"] != 1] for k, v in dets[i].items()}
    dets[4]["labels"][:] = 1  # image 4: its a and c boxes relabelled to b (ignored class) -> a and c missed there
    res = evaluate_detections(recs, CLASSES, dets, class_ids=[0, 2])
    assert set(res.per_class) == {"a", "c"}
    assert res.per_class["a"]["ap50"] == pytest.approx(75.0, abs=1.0)
    assert res.per_class["c"]["ap50"] == pytest.approx(50.0, abs=1.0)
    assert res.map50 == pytest.approx((res.per_class["a"]["ap50"] + res.per_class["c"]["ap50"]) / 2)


def test_class_without_gt_is_nan_and_excluded(tmp_path) -> None:
    recs = _records()
    for r in recs:  # remove every class-c box
        keep = r.labels != 2
        r.boxes, r.labels = r.boxes[keep], r.labels[keep]
    res = evaluate_detections(recs, CLASSES, _perfect(recs), groups={"new": [2]})
    assert math.isnan(res.per_class["c"]["ap50"]) and math.isnan(res.groups["new"])
    assert res.map50 == pytest.approx(100.0)
    assert "n/a" in format_table(res)
    path = save_result_json(res, tmp_path / "sub" / "eval.json")
    d = json.loads(path.read_text())
    assert d["per_class"]["c"]["ap50"] is None and d["map50"] == pytest.approx(100.0)
    back = EvalResult(**d)  # JSON round trip restores NaN
    assert math.isnan(back.per_class["c"]["ap"]) and back.per_class["a"]["ap50"] == pytest.approx(100.0)
    assert result_to_dict(back) == d
