"""ATSS, VLR and fine-grained selection checked against slow brute-force references."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from sdidd.model.anchors import make_anchor_grid
from sdidd.model.assigner import anchor_boxes, assign_targets, atss_assign, finegrained_mask, vlr_region
from sdidd.data.transforms import pad_targets

STRIDES = [8, 16, 32, 64, 128]


def _grid(h: int = 64, w: int = 96):
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    grid = make_anchor_grid(sizes, STRIDES, torch.device("cpu"))
    return anchor_boxes(grid.points, grid.strides), grid.num_per_level


def _random_gts(gen: torch.Generator, n: int, h: int = 64, w: int = 96) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
    wh = 3.0 + torch.rand(n, 2, generator=gen) * 70.0
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=1)


# ---- brute-force references (plain Python floats, loops everywhere) ----

def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _centre(a):
    return ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)


def _diou(a, b) -> float:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    return _iou(a, b) - ((ax - bx) ** 2 + (ay - by) ** 2) / (cw**2 + ch**2)


def _ref_atss(anchors, num_per_level, gts, topk=9):
    anchors, gts = anchors.double().tolist(), gts.double().tolist()
    qualifying = [[] for _ in anchors]
    thresholds = []
    for g, gt in enumerate(gts):
        gx, gy = _centre(gt)
        cands, start = [], 0
        for n in num_per_level:
            level = list(range(start, start + n))
            level.sort(key=lambda i: math.hypot(_centre(anchors[i])[0] - gx, _centre(anchors[i])[1] - gy))
            cands += level[: min(topk, n)]
            start += n
        ious = [_iou(anchors[i], gt) for i in cands]
        thr = statistics.mean(ious) + statistics.stdev(ious)
        thresholds.append(thr)
        for i, v in zip(cands, ious):
            cx, cy = _centre(anchors[i])
            inside = min(cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy) > 0.01
            if v >= thr and inside:
                qualifying[i].append((v, g))
    assigned = []
    for q in qualifying:
        if not q:
            assigned.append(-1)
        else:
            best = max(v for v, _ in q)
            assigned.append(min(g for v, g in q if v == best))
    return assigned, thresholds


def _ref_vlr(anchors, gts, thresholds, low=0.25):
    out = []
    for a in anchors.double().tolist():
        best = None
        for gt, thr in zip(gts.double().tolist(), thresholds):
            d = _diou(a, gt)
            if low * thr <= d < thr:
                v = _iou(a, gt)
                best = v if best is None else max(best, v)
        out.append(0.0 if best is None else best)
    return out


def _ref_finegrained(anchors, gts, ratio=0.5):
    anchors, gts = anchors.double().tolist(), gts.double().tolist()
    best = [max(_iou(a, g) for a in anchors) for g in gts]
    return [any(_iou(a, g) > ratio * m for g, m in zip(gts, best)) for a in anchors]


# ---- tests ----

def test_anchor_boxes_are_squares_of_eight_strides():
    pts = torch.tensor([[4.0, 4.0], [24.0, 8.0]])
    boxes = anchor_boxes(pts, torch.tensor([8.0, 16.0]))
    assert torch.equal(boxes, torch.tensor([[-28.0, -28.0, 36.0, 36.0], [-40.0, -56.0, 88.0, 72.0]]))
    grid = make_anchor_grid([(2, 3)], [8], torch.device("cpu"))
    assert torch.equal(anchor_boxes(grid.points, grid.strides), grid.boxes)


@pytest.mark.parametrize("seed,num_gt", [(0, 1), (1, 3), (2, 5), (3, 8), (4, 2), (5, 6)])
def test_atss_matches_brute_force(seed, num_gt):
    anchors, npl = _grid()
    gts = _random_gts(torch.Generator().manual_seed(seed), num_gt)
    res = atss_assign(anchors, npl, gts)
    ref_assigned, ref_thr = _ref_atss(anchors, npl, gts)
    assert res.assigned.tolist() == ref_assigned
    assert torch.allclose(res.threshold.double(), torch.tensor(ref_thr, dtype=torch.float64), atol=1e-5)
    assert res.iou.shape == (anchors.shape[0], num_gt)
    assert (res.assigned >= 0).any()


def test_atss_topk_capped_by_level_size_and_other_topk():
    anchors, npl = _grid()
    gts = _random_gts(torch.Generator().manual_seed(11), 4)
    for k in (3, 20):  # 20 exceeds the 6, 2 and 1 anchors of the coarse levels
        ref_assigned, ref_thr = _ref_atss(anchors, npl, gts, topk=k)
        res = atss_assign(anchors, npl, gts, topk=k)
        assert res.assigned.tolist() == ref_assigned
        assert torch.allclose(res.threshold.double(), torch.tensor(ref_thr, dtype=torch.float64), atol=1e-5)


def test_atss_empty_gt():
    anchors, npl = _grid()
    res = atss_assign(anchors, npl, torch.zeros((0, 4)))
    assert torch.equal(res.assigned, torch.full((anchors.shape[0],), -1))
    assert res.iou.shape == (anchors.shape[0], 0) and res.threshold.shape == (0,)


def test_atss_gt_without_qualifying_anchor():
    anchors, npl = _grid()
    # A thin box strictly between anchor centres of every level (x centres 4,12,20 / 8,24 / 16 / 32 / 64).
    thin = torch.tensor([[17.0, 30.0, 19.5, 60.0]])
    gts = torch.cat([_random_gts(torch.Generator().manual_seed(7), 2), thin])
    res = atss_assign(anchors, npl, gts)
    ref_assigned, _ = _ref_atss(anchors, npl, gts)
    assert res.assigned.tolist() == ref_assigned
    assert not (res.assigned == 2).any()
    assert (res.assigned >= 0).any()


def test_atss_overlapping_gts_go_to_max_iou():
    anchors, npl = _grid()
    gts = torch.tensor([[10.0, 10.0, 60.0, 58.0], [12.0, 14.0, 62.0, 60.0], [14.0, 8.0, 66.0, 56.0]])
    res = atss_assign(anchors, npl, gts)
    ref_assigned, _ = _ref_atss(anchors, npl, gts)
    assert res.assigned.tolist() == ref_assigned
    pos = res.assigned >= 0
    assert pos.any()
    # Every positive is assigned to a GT whose IoU is the largest among the GTs it qualifies for.
    assert torch.all(res.iou[pos, res.assigned[pos]] > 0)


@pytest.mark.parametrize("seed,num_gt", [(0, 1), (3, 4), (9, 7)])
def test_vlr_region_matches_brute_force(seed, num_gt):
    anchors, npl = _grid()
    gts = _random_gts(torch.Generator().manual_seed(seed), num_gt)
    res = atss_assign(anchors, npl, gts)
    region = vlr_region(anchors, gts, res.threshold)
    ref = torch.tensor(_ref_vlr(anchors, gts, res.threshold.double().tolist()), dtype=torch.float32)
    assert torch.allclose(region, ref, atol=1e-6)
    assert (region > 0).any()
    assert torch.equal(vlr_region(anchors, gts, res.threshold, iou=res.iou), region)
    assert torch.equal(vlr_region(anchors, gts[:0], res.threshold[:0]), torch.zeros(anchors.shape[0]))


@pytest.mark.parametrize("seed,num_gt", [(1, 1), (2, 3), (8, 6)])
def test_finegrained_matches_brute_force(seed, num_gt):
    anchors, _ = _grid()
    gts = _random_gts(torch.Generator().manual_seed(seed), num_gt)
    assert finegrained_mask(anchors, gts).tolist() == _ref_finegrained(anchors, gts)
    assert not finegrained_mask(anchors, gts[:0]).any()


def test_finegrained_relative_threshold_keeps_hard_small_gt():
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [100.0, 100.0, 110.0, 110.0], [50.0, 50.0, 90.0, 90.0]]
    )
    easy = [0.0, 0.0, 10.0, 10.0]  # best IoU 1.0: anchor 1 has IoU exactly 0.5, not > 0.5 -> excluded
    hard = [100.0, 100.0, 101.0, 130.0]  # thin defect: best IoU 10/120 ~ 0.083, still imitated
    mask = finegrained_mask(anchors, torch.tensor([easy, hard]))
    assert mask.tolist() == [True, False, True, False]


def test_vlr_boundaries_are_half_open():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]])  # DIoU 1.0 and 0.5 - 25/500 = 0.45
    # Upper bound excluded: DIoU == thr is not in the VLR; just above it is.
    assert vlr_region(anchors[:1], gt, torch.tensor([1.0])).tolist() == [0.0]
    assert vlr_region(anchors[:1], gt, torch.tensor([1.0 + 1e-3])).tolist() == [1.0]
    # Lower bound included: DIoU == low * thr is in the VLR, and its value is the IoU (0.5), not the DIoU.
    assert torch.allclose(vlr_region(anchors[1:], gt, torch.tensor([0.9]), low=0.5), torch.tensor([0.5]))
    assert vlr_region(anchors[1:], gt, torch.tensor([0.9001]), low=0.5).tolist() == [0.0]


# ---- batched assignment (one ATSS per step, reused by every selection) ----

def _padded_batch(seed: int = 21):
    """Three images with 3, 0 and 5 GTs; a padded row is also put in the middle of image 0."""
    gen = torch.Generator().manual_seed(seed)
    per_image = [_random_gts(gen, 3), torch.zeros((0, 4)), _random_gts(gen, 5)]
    boxes, labels = pad_targets(per_image, [torch.arange(len(b)) for b in per_image])
    # Move image 0's GTs to rows 0, 2, 3 and pad row 1 with a garbage box that would match anchors.
    boxes = torch.cat([boxes[:, :1], torch.zeros(3, 1, 4), boxes[:, 1:]], dim=1)
    labels = torch.cat([labels[:, :1], torch.full((3, 1), -1), labels[:, 1:]], dim=1)
    boxes[0, 1] = torch.tensor([10.0, 10.0, 60.0, 50.0])
    return per_image, boxes, labels


def test_batched_assignment_equals_per_image_atss():
    grid = make_anchor_grid([(math.ceil(64 / s), math.ceil(96 / s)) for s in STRIDES], STRIDES, torch.device("cpu"))
    per_image, boxes, labels = _padded_batch()
    asg = assign_targets(grid, boxes, labels)
    assert asg.iou.shape == (3, grid.points.shape[0], boxes.shape[1])
    for b, gts in enumerate(per_image):
        rows = asg.gt_valid[b].nonzero().squeeze(1)  # batch row of each of the image's GTs
        assert len(rows) == len(gts)
        ref = atss_assign(grid.boxes, grid.num_per_level, gts)
        # Same positives, mapped to the same GTs (through the row numbers of the padded layout).
        expected = torch.where(ref.assigned >= 0, rows[ref.assigned.clamp(min=0)] if len(rows) else ref.assigned, -1)
        assert torch.equal(asg.assigned[b], expected)
        assert torch.equal(asg.iou[b][:, rows], ref.iou)
        # The reductions may group the sums differently for another batch layout: last-bit differences only.
        assert torch.allclose(asg.threshold[b, rows], ref.threshold, rtol=1e-6, atol=0)
        # Padded rows: zero IoU/threshold, never assigned, never in the VLR or fine-grained selections.
        pad = ~asg.gt_valid[b]
        assert not torch.isin(asg.assigned[b], pad.nonzero().squeeze(1)).any()
        assert (asg.iou[b][:, pad] == 0).all() and (asg.threshold[b, pad] == 0).all()
        assert torch.equal(asg.vlr_region()[b], vlr_region(grid.boxes, gts, asg.threshold[b, rows]))
        assert torch.equal(asg.finegrained_mask()[b], finegrained_mask(grid.boxes, gts))
        if len(gts):
            assert torch.equal(asg.assigned_boxes[b][ref.assigned >= 0], gts[ref.assigned[ref.assigned >= 0]])
    assert asg.pos_mask[0].any() and not asg.pos_mask[1].any() and asg.pos_mask[2].any()
    assert int(asg.num_pos) == int(asg.pos_mask.sum())
    assert (asg.assigned_labels[~asg.pos_mask] == -1).all()
    # The fixed slots hold every positive exactly once.
    idx, slot_pos = asg.positive_slots()
    assert idx.shape[1] <= asg.gt_boxes.shape[1] * asg.num_candidates
    for b in range(3):
        assert sorted(idx[b][slot_pos[b]].tolist()) == asg.pos_mask[b].nonzero().squeeze(1).tolist()


def test_batched_assignment_all_padding_and_no_gt():
    grid = make_anchor_grid([(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)], STRIDES, torch.device("cpu"))
    for g in (0, 2):
        asg = assign_targets(grid, torch.full((2, g, 4), float("nan")), torch.full((2, g), -1))
        assert not asg.pos_mask.any() and asg.iou.shape == (2, grid.points.shape[0], g)
        assert torch.isfinite(asg.iou).all() and torch.isfinite(asg.gt_boxes).all()  # padding never leaks NaN
        assert not asg.vlr_region().any() and not asg.finegrained_mask().any()
        assert asg.assigned_boxes.shape == (2, grid.points.shape[0], 4)


def test_inside_boxes_matches_brute_force_and_skips_padding_and_lower_labels():
    """An anchor is inside when its centre lies strictly inside a real GT whose channel is >= min_label."""
    _, boxes, labels = _padded_batch()
    labels = torch.where(labels >= 0, labels + 1, labels)  # channels 1.. so that min_label 3 leaves some out
    grid = make_anchor_grid([(math.ceil(64 / s), math.ceil(96 / s)) for s in STRIDES], STRIDES, torch.device("cpu"))
    asg = assign_targets(grid, boxes, labels)
    for min_label in (0, 3):
        got = asg.inside_boxes(min_label)
        assert got.shape == (3, grid.points.shape[0])
        for b in range(3):
            for a in range(0, grid.points.shape[0], 7):
                x, y = grid.points[a].tolist()
                want = any(lab >= 0 and lab >= min_label and box[0] < x < box[2] and box[1] < y < box[3]
                           for box, lab in zip(boxes[b].tolist(), labels[b].tolist()))
                assert bool(got[b, a]) == want, (min_label, b, a)
    assert not asg.inside_boxes(0)[1].any()  # the image without GTs
    assert asg.inside_boxes(0)[0].any() and asg.inside_boxes(100).sum() == 0
