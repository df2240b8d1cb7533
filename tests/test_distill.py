"""Distillation losses: zero at student == teacher, exact selections, empty-set safety, descent toward the teacher."""
from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch

from sdidd.distill import (
    box_logit_mask,
    confident_mask,
    decode_teacher_boxes,
    distribution_kl,
    dscrd_loss,
    erd_box_loss,
    hccd_loss,
    idfd_loss,
    kd_mismatch_loss,
)
from sdidd.config import DistillConfig, LossConfig
from sdidd.errors import SdiddError
from sdidd.engine.objective import step_loss
from sdidd.model.anchors import make_anchor_grid
from sdidd.model.assigner import anchor_boxes, assign_targets, atss_assign, finegrained_mask, vlr_region
from sdidd.data.transforms import pad_targets
from sdidd.model.detector import DenseOutput

STRIDES = [8, 16, 32, 64, 128]
NEW = slice(3, 6)


def _grid(h: int = 64, w: int = 96):
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    grid = make_anchor_grid(sizes, STRIDES, torch.device("cpu"))
    return grid, anchor_boxes(grid.points, grid.strides)


def _gts():
    return [torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 5.0, 70.0, 60.0]]), torch.tensor([[20.0, 20.0, 90.0, 62.0], [2.0, 1.0, 95.0, 63.0]])]


def _assign(grid, gts):
    """The step's shared Assignment for per-image GT lists (labels: new channel 3)."""
    boxes, labels = pad_targets(gts, [torch.full((len(g),), 3) for g in gts])
    return assign_targets(grid, boxes, labels)


def _descends(loss_fn, student: torch.Tensor, lr: float) -> tuple[float, float]:
    """Loss before and after one plain gradient step on the student."""
    student = student.clone().requires_grad_(True)
    before = loss_fn(student)
    before.backward()
    assert torch.isfinite(student.grad).all()
    with torch.no_grad():
        after = loss_fn(student - lr * student.grad)
    return float(before.detach()), float(after)


# ---- shared KL ----

def test_distribution_kl_hand_value_and_zero():
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> [0.75, 0.25]
    student = torch.zeros(1, 2)  # softmax -> [0.5, 0.5]
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2  # mean over the 2 bins
    assert math.isclose(float(distribution_kl(student, teacher, 1.0)), expected, rel_tol=1e-6)
    # T = 2 on doubled logits gives the same distributions, times T^2 = 4.
    assert math.isclose(float(distribution_kl(student, 2 * teacher, 2.0)), 4 * expected, rel_tol=1e-6)
    x = torch.randn(5, 17)
    assert torch.equal(distribution_kl(x, x.clone(), 10.0), torch.zeros(5))


def test_distribution_kl_teacher_detached_and_stable():
    teacher = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)  # softmax underflows to exact zeros
    student = torch.zeros(1, 3, requires_grad=True)
    kl = distribution_kl(student, teacher, 1.0)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()
    assert teacher.grad is None


# ---- (1) HCCD ----

def _hccd_teacher() -> torch.Tensor:
    t = torch.full((2, 20, 3), -4.0)
    t[0, 3, 1] = 3.0  # confident on class 1: the max over classes must see it
    t[0, 11, 0] = 2.5
    t[0, 7, 2] = 0.0  # 0.5: above mu + 1 sigma (0.43) but below mu + 2 sigma (0.73)
    t[1, 5, 2] = 1.0  # image 1: a single confident anchor
    return t


def test_hccd_selects_hand_computed_anchors():
    t = _hccd_teacher()
    mask = confident_mask(t)
    assert mask[0].nonzero().squeeze(1).tolist() == [3, 11]
    assert mask[1].nonzero().squeeze(1).tolist() == [5]
    # Cross-check the threshold rule itself with Python's statistics (sample std).
    s = t[0].sigmoid().amax(-1).tolist()
    thr = statistics.mean(s) + 2 * statistics.stdev(s)
    assert [i for i, v in enumerate(s) if v > thr] == [3, 11]
    assert [i for i, v in enumerate(s) if v > statistics.mean(s) + statistics.stdev(s)] == [3, 7, 11]


def test_hccd_min_score_drops_relatively_confident_but_weak_anchors():
    t = _hccd_teacher()  # anchors 3 (0.95), 11 (0.92) and, in image 1, 5 (sigmoid(1) = 0.73)
    assert confident_mask(t, min_score=0.8)[0].nonzero().squeeze(1).tolist() == [3, 11]
    assert not confident_mask(t, min_score=0.8)[1].any()
    assert torch.equal(confident_mask(t, min_score=0.0), confident_mask(t))
    student = t.clone()
    student[1, 5] += 2.0  # only the dropped anchor differs: no loss with the floor, a loss without it
    assert hccd_loss(student, t, min_score=0.8)[0].item() == 0.0 and hccd_loss(student, t)[0].item() > 0


def test_hccd_value_zero_and_descent():
    t = _hccd_teacher()
    student = torch.cat([t, torch.randn(2, 20, 3)], dim=-1)  # new channels are ignored
    loss, n = hccd_loss(student, t)
    assert n == 3 and loss.item() == 0.0
    shifted = student.clone()
    shifted[..., :3] += 1.0
    loss, _ = hccd_loss(shifted, t, weight=0.5)
    assert math.isclose(loss.item(), 0.5 * 2.0, rel_tol=1e-6)  # mean 1 per image, 2 images
    noisy = student + torch.randn(2, 20, 6, generator=torch.Generator().manual_seed(0))
    before, after = _descends(lambda s: hccd_loss(s, t)[0], noisy, lr=0.1)
    assert after < before


def test_hccd_empty_selection():
    t = torch.zeros(2, 20, 3)  # flat scores: std 0, nothing strictly above the mean
    student = torch.randn(2, 20, 6, requires_grad=True)
    loss, n = hccd_loss(student, t)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all() and float(student.grad.abs().sum()) == 0.0


# ---- ERD box ----

def _peaked_reg(num: int, peaks: dict[int, float], bin_: int = 4) -> torch.Tensor:
    reg = torch.zeros(1, num, 4, 17)
    for a, v in peaks.items():
        reg[0, a, :, bin_] = v
    return reg


def test_box_logit_mask_hand_computed():
    reg = _peaked_reg(20, {2: 3.0, 9: 6.0, 15: 5.0})
    reg[0, 4, 0, 0] = 1.0  # small peak, below mu + 2 sigma
    peaks = reg[0].flatten(1).amax(-1).tolist()
    thr = statistics.mean(peaks) + 2 * statistics.stdev(peaks)
    assert box_logit_mask(reg)[0].nonzero().squeeze(1).tolist() == [9, 15]
    assert [i for i, v in enumerate(peaks) if v > thr] == [9, 15]


def test_decode_teacher_boxes_stride_switch():
    gen = torch.Generator().manual_seed(0)
    reg = torch.randn(3, 4, 17, generator=gen)
    points = torch.tensor([[4.0, 4.0], [24.0, 8.0], [64.0, 64.0]])
    strides = torch.tensor([8.0, 16.0, 128.0])
    scaled = decode_teacher_boxes(reg, points, strides, scale_by_stride=True)
    raw = decode_teacher_boxes(reg, points, strides, scale_by_stride=False)
    centre = torch.cat([points, points], dim=1)
    assert torch.allclose(scaled - centre, (raw - centre) * strides[:, None], atol=1e-4)
    # Raw boxes stay within 16 px of the centre (the as-released quirk).
    assert float((raw - centre).abs().max()) <= 16.0


def test_erd_box_nms_depends_on_stride_switch():
    # Two selected neighbours 8 px apart at stride 8, every side at bin 4: 32 px boxes overlap, 4 px boxes do not.
    num = 20
    points = torch.stack([torch.arange(num, dtype=torch.float32) * 8 + 4, torch.full((num,), 4.0)], dim=1)
    strides = torch.full((num,), 8.0)
    t_reg = _peaked_reg(num, {6: 9.0, 7: 9.5})
    t_cls = torch.full((1, num, 3), -3.0)
    t_cls[0, 6, 0], t_cls[0, 7, 0] = 2.0, 1.0  # same label; anchor 6 scores higher
    s_cls = torch.cat([t_cls, torch.zeros(1, num, 3)], dim=-1)
    s_reg = t_reg + torch.randn(t_reg.shape, generator=torch.Generator().manual_seed(1))
    _, kept_scaled = erd_box_loss(s_cls, s_reg, t_cls, t_reg, points, strides, scale_by_stride=True)
    _, kept_raw = erd_box_loss(s_cls, s_reg, t_cls, t_reg, points, strides, scale_by_stride=False)
    assert kept_scaled == 1 and kept_raw == 2
    # The kept anchor under NMS is anchor 6: the loss equals its KL alone.
    loss, _ = erd_box_loss(s_cls, s_reg, t_cls, t_reg, points, strides, weight=1.0)
    w = float(torch.sigmoid(s_cls[0, 6, :3]).max())
    expected = w * float(distribution_kl(s_reg[0, 6], t_reg[0, 6], 10.0).sum()) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_erd_box_zero_weighting_and_descent():
    grid, _ = _grid()
    num = grid.points.shape[0]
    gen = torch.Generator().manual_seed(2)
    t_reg = torch.randn(2, num, 4, 17, generator=gen) * 2
    t_cls = torch.randn(2, num, 3, generator=gen) * 2
    s_cls = torch.cat([t_cls, torch.randn(2, num, 3, generator=gen)], dim=-1)
    loss, kept = erd_box_loss(s_cls, t_reg.clone(), t_cls, t_reg, grid.points, grid.strides)
    assert kept > 0 and loss.item() == 0.0
    s_reg = t_reg + torch.randn(t_reg.shape, generator=gen)
    base, _ = erd_box_loss(s_cls, s_reg, t_cls, t_reg, grid.points, grid.strides)
    # Weights are the student's OLD-class scores: new channels are irrelevant, sigmoid -> 1 doubles vs 0.5.
    other_new = s_cls.clone()
    other_new[..., 3:] = 5.0
    assert torch.equal(erd_box_loss(other_new, s_reg, t_cls, t_reg, grid.points, grid.strides)[0], base)
    half = s_cls.clone()
    half[..., :3] = 0.0
    full = s_cls.clone()
    full[..., :3] = 30.0
    l_half = erd_box_loss(half, s_reg, t_cls, t_reg, grid.points, grid.strides)[0]
    l_full = erd_box_loss(full, s_reg, t_cls, t_reg, grid.points, grid.strides)[0]
    assert math.isclose(float(l_full), 2 * float(l_half), rel_tol=1e-5)
    before, after = _descends(
        lambda r: erd_box_loss(s_cls, r, t_cls, t_reg, grid.points, grid.strides)[0], s_reg, lr=50.0
    )
    assert 0 < after < before


def test_erd_box_empty_selection():
    num = 10
    points = torch.rand(num, 2) * 50
    strides = torch.full((num,), 8.0)
    t_reg = torch.zeros(2, num, 4, 17)  # flat: nothing above mu + 2 sigma
    s_reg = torch.randn(2, num, 4, 17, requires_grad=True)
    loss, kept = erd_box_loss(torch.randn(2, num, 6), s_reg, torch.randn(2, num, 3), t_reg, points, strides)
    assert kept == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s_reg.grad).all()


# ---- (2) DSCRD ----

def _dscrd_setup(seed: int = 3):
    grid, anchors = _grid()
    num = anchors.shape[0]
    gen = torch.Generator().manual_seed(seed)
    t_reg = torch.randn(2, num, 4, 17, generator=gen) * 2
    s_cls = torch.randn(2, num, 6, generator=gen)
    s_reg = t_reg + torch.randn(t_reg.shape, generator=gen)
    return grid, anchors, t_reg, s_cls, s_reg


def test_dscrd_matches_per_anchor_reference():
    grid, anchors, t_reg, s_cls, s_reg = _dscrd_setup()
    gts = _gts()
    asg = _assign(grid, gts)
    out = dscrd_loss(s_cls, s_reg, t_reg, asg, NEW)
    ld_ref, vlr_ref, n_pos, n_vlr = 0.0, 0.0, 0, 0
    for b in range(2):
        res = atss_assign(anchors, grid.num_per_level, gts[b])
        region = vlr_region(anchors, gts[b], res.threshold)
        assert torch.equal(asg.pos_mask[b], res.assigned >= 0)
        for a in range(anchors.shape[0]):  # slow loop on purpose: an independent reference
            kl = float(distribution_kl(s_reg[b, a], t_reg[b, a], 10.0).sum())
            if res.assigned[a] >= 0:
                ld_ref += float(torch.sigmoid(s_cls[b, a, 3:]).max()) * kl / 4
                n_pos += 1
            if region[a] > 0:
                vlr_ref += float(region[a]) * kl / 16
                n_vlr += 1
    assert out["n_pos"] == n_pos > 0 and out["n_vlr"] == n_vlr > 0
    assert math.isclose(out["ld"].item(), 0.25 * ld_ref, rel_tol=1e-5)
    assert math.isclose(out["vlr"].item(), 0.25 * vlr_ref, rel_tol=1e-5)


def test_dscrd_zero_weights_and_descent():
    grid, anchors, t_reg, s_cls, s_reg = _dscrd_setup()
    asg = _assign(grid, _gts())
    same = dscrd_loss(s_cls, t_reg.clone(), t_reg, asg, NEW)
    assert float(same["ld"]) == 0.0 and float(same["vlr"]) == 0.0 and same["n_pos"] > 0
    base = dscrd_loss(s_cls, s_reg, t_reg, asg, NEW)
    other_old = s_cls.clone()
    other_old[..., :3] = 7.0  # ld weights read the NEW-class channels only
    assert torch.equal(dscrd_loss(other_old, s_reg, t_reg, asg, NEW)["ld"], base["ld"])

    def total(r):
        o = dscrd_loss(s_cls, r, t_reg, asg, NEW)
        return o["ld"] + o["vlr"]

    before, after = _descends(total, s_reg, lr=50.0)
    assert 0 < after < before


def test_dscrd_old_class_boxes_weighted_by_old_channels():
    """LD at an old-class box (pseudo-label or labelled old defect) reads the old channels, so it is not switched off."""
    grid, anchors, t_reg, s_cls, s_reg = _dscrd_setup()
    gts = _gts()
    boxes, labels = pad_targets(gts, [torch.tensor([0, 3]), torch.tensor([3, 1])])  # one old-class box per image
    asg = assign_targets(grid, boxes, labels)
    quiet_new = s_cls.clone()
    quiet_new[..., 3:] = -30.0  # the new channels score ~0 at every anchor
    out = dscrd_loss(quiet_new, s_reg, t_reg, asg, NEW)
    assert float(out["ld"]) > 0  # was exactly 0 when the weight read the new channels only
    label = torch.gather(asg.gt_labels, 1, asg.assigned.clamp(min=0))
    ref = 0.0
    for b in range(2):
        for a in torch.nonzero(asg.pos_mask[b]).flatten().tolist():
            ch = slice(0, 3) if int(label[b, a]) < 3 else NEW
            kl = float(distribution_kl(s_reg[b, a], t_reg[b, a], 10.0).sum())
            ref += float(torch.sigmoid(quiet_new[b, a, ch]).max()) * kl / 4
    assert math.isclose(out["ld"].item(), 0.25 * ref, rel_tol=1e-5)


def test_dscrd_teacher_fit_weights_each_anchor_by_the_teachers_box_iou_with_its_gt():
    """distill.dscrd_teacher_iou: the old teacher's box at an anchor counts as far as it fits that anchor's GT box."""
    from torchvision.ops import box_iou

    from sdidd.distill.regression import teacher_box_fit
    from sdidd.model.head import integral

    grid, anchors, t_reg, s_cls, s_reg = _dscrd_setup()
    gts = _gts()
    asg = _assign(grid, gts)
    fit = teacher_box_fit(t_reg, asg, grid)
    region = asg.vlr_region()
    dist = integral(t_reg) * grid.strides[None, :, None]
    checked = 0
    for b in range(2):
        for a in torch.nonzero(asg.pos_mask[b] | (region[b] > 0)).flatten().tolist():  # independent reference
            box = torch.cat([grid.points[a] - dist[b, a, :2], grid.points[a] + dist[b, a, 2:]])[None]
            g = int(asg.assigned[b, a]) if asg.pos_mask[b, a] else int(box_iou(anchors[a:a + 1], gts[b]).argmax())
            assert math.isclose(float(fit[b, a]), float(box_iou(box, gts[b][g:g + 1])), abs_tol=1e-5)
            checked += 1
    assert checked > 10 and 0 < float(fit[asg.pos_mask].mean()) < 1
    base = dscrd_loss(s_cls, s_reg, t_reg, asg, NEW)
    ones = dscrd_loss(s_cls, s_reg, t_reg, asg, NEW, teacher_fit=torch.ones_like(fit))
    assert torch.equal(ones["ld"], base["ld"]) and torch.equal(ones["vlr"], base["vlr"])
    zero = dscrd_loss(s_cls, s_reg, t_reg, asg, NEW, teacher_fit=torch.zeros_like(fit))
    assert float(zero["ld"]) == 0.0 and float(zero["vlr"]) == 0.0
    weighted = dscrd_loss(s_cls, s_reg, t_reg, asg, NEW, teacher_fit=fit)
    assert 0 < float(weighted["ld"]) < float(base["ld"]) and 0 < float(weighted["vlr"]) < float(base["vlr"])
    # An image without GT: nothing to fit.
    assert teacher_box_fit(t_reg, _assign(grid, [torch.zeros(0, 4)] * 2), grid).abs().sum() == 0


def test_dscrd_empty_gts():
    grid, anchors, t_reg, s_cls, s_reg = _dscrd_setup()
    s_reg = s_reg.clone().requires_grad_(True)
    asg = _assign(grid, [torch.zeros(0, 4)] * 2)
    out = dscrd_loss(s_cls, s_reg, t_reg, asg, NEW)
    assert out["n_pos"] == 0 and out["n_vlr"] == 0
    assert out["ld"].item() == 0.0 and out["vlr"].item() == 0.0
    (out["ld"] + out["vlr"]).backward()
    assert torch.isfinite(s_reg.grad).all() and float(s_reg.grad.abs().sum()) == 0.0


def test_kd_mismatch_quirk():
    gen = torch.Generator().manual_seed(4)
    t_cls = torch.randn(1, 6, 3, generator=gen)
    pos = torch.tensor([[True, False, True, True, False, False]])
    s_cls = torch.cat([torch.randn(1, 6, 3, generator=gen), t_cls], dim=-1)  # NEW channels == teacher OLD
    assert float(kd_mismatch_loss(s_cls, t_cls, pos, NEW)) == 0.0
    s_cls = torch.randn(1, 6, 6, generator=gen)
    kl = distribution_kl(s_cls[0, :, 3:], t_cls[0], 2.0)
    glob = kd_mismatch_loss(s_cls, t_cls, pos, NEW)
    assert math.isclose(float(glob), 0.25 * float(kl[[0, 2, 3]].mean()), rel_tol=1e-6)
    per_level = kd_mismatch_loss(s_cls, t_cls, pos, NEW, num_per_level=[2, 4])  # levels {0,1}, {2..5}
    assert math.isclose(float(per_level), 0.25 * (float(kl[0]) + float(kl[[2, 3]].mean())), rel_tol=1e-6)
    empty = kd_mismatch_loss(s_cls, t_cls, torch.zeros_like(pos), NEW)
    assert float(empty) == 0.0 and torch.isfinite(empty)


# ---- (3) IDFD ----

def _feats(grid, gen, batch: int = 2, ch: int = 4):
    return [torch.randn(batch, ch, h, w, generator=gen) for h, w in grid.sizes]


def test_idfd_mask_layout_value_and_zero():
    grid, anchors = _grid()  # non-square levels: a transposed layout would leak the perturbation below
    gen = torch.Generator().manual_seed(5)
    t_feats = _feats(grid, gen)
    gts = _gts()
    asg = _assign(grid, gts)
    masks = torch.stack([finegrained_mask(anchors, g) for g in gts])  # [B, A], per image from its own boxes
    assert torch.equal(asg.finegrained_mask(), masks)
    loss, n = idfd_loss([f.clone() for f in t_feats], t_feats, asg)
    assert loss.item() == 0.0 and n == int(masks.sum()) > 0
    # +1 on masked positions, +100 on unmasked ones: only the masked ones count -> 1 per non-empty level.
    s_feats, nonempty = [], 0
    for f, m in zip(t_feats, masks.split(grid.num_per_level, dim=1)):
        m = m.view(f.shape[0], 1, f.shape[2], f.shape[3]).float()
        s_feats.append(f + m + 100.0 * (1 - m))
        nonempty += int(m.sum() > 0)
    loss, _ = idfd_loss(s_feats, t_feats, asg, weight=2.0)
    assert nonempty >= 2 and math.isclose(loss.item(), 2.0 * nonempty, rel_tol=1e-6)


def test_idfd_quirk_and_descent():
    grid, anchors = _grid()
    gen = torch.Generator().manual_seed(6)
    t_feats = _feats(grid, gen)
    s_feats = [f + torch.randn(f.shape, generator=gen) for f in t_feats]
    asg = _assign(grid, _gts())
    full, _ = idfd_loss(s_feats, t_feats, asg)
    # The quirk reads the Assignment's positives: none at all -> every level dropped.
    no_pos = dataclasses.replace(asg, assigned=torch.full_like(asg.assigned, -1))
    zeroed, _ = idfd_loss(s_feats, t_feats, no_pos, zero_levels_without_positives=True)
    assert full.item() > 0 and zeroed.item() == 0.0
    only_p3 = torch.full_like(asg.assigned, -1)
    only_p3[0, 0] = 0  # one positive, on P3
    p3_only, _ = idfd_loss(
        s_feats, t_feats, dataclasses.replace(asg, assigned=only_p3), zero_levels_without_positives=True
    )
    # The same as P3's own term: the other levels' students equal their teachers.
    p3_alone, _ = idfd_loss(s_feats[:1] + t_feats[1:], t_feats, asg)
    assert torch.allclose(p3_only, p3_alone) and 0 < p3_only.item() < full.item()

    params = [f.clone().requires_grad_(True) for f in s_feats]
    before = idfd_loss(params, t_feats, asg)[0]
    before.backward()
    with torch.no_grad():
        stepped = [p - 0.1 * p.grad for p in params]
    after = idfd_loss(stepped, t_feats, asg)[0]
    assert 0 < after.item() < before.item()


def test_idfd_empty():
    grid, anchors = _grid()
    gen = torch.Generator().manual_seed(7)
    s_feats = [f.requires_grad_(True) for f in _feats(grid, gen)]
    for normalize in (False, True):
        loss, n = idfd_loss(s_feats, _feats(grid, gen), _assign(grid, [torch.zeros(0, 4)] * 2), normalize=normalize)
        assert n == 0 and loss.item() == 0.0
        loss.backward()
        assert all(torch.isfinite(f.grad).all() and float(f.grad.abs().sum()) == 0.0 for f in s_feats)


def test_idfd_normalize_is_scale_invariant():
    """With normalize=True the feature term does not depend on the FPN's feature scale."""
    from sdidd.distill.feature import idfd_loss
    from sdidd.model.anchors import make_anchor_grid
    torch.manual_seed(0)
    grid = make_anchor_grid([(8, 8), (4, 4)], [8, 16], torch.device("cpu"))
    ft = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    fs = [f + 0.1 * torch.randn_like(f) for f in ft]
    asg = _assign(grid, [torch.tensor([[10.0, 10.0, 40.0, 30.0]])])
    a, n = idfd_loss(fs, ft, asg, normalize=True)
    b, _ = idfd_loss([10 * f for f in fs], [10 * f for f in ft], asg, normalize=True)
    c, _ = idfd_loss([10 * f for f in fs], [10 * f for f in ft], asg, normalize=False)
    assert n > 0 and a.item() > 0
    assert torch.allclose(a, b, rtol=1e-4)
    d, _ = idfd_loss(fs, ft, asg, normalize=False)
    assert torch.allclose(c, 100 * d, rtol=1e-4)  # the plain MSE grows with the square of the scale


# ---- mu+2sigma over the unpadded image only ----

def _level_grid(h: int, w: int):
    return make_anchor_grid([(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES], STRIDES, torch.device("cpu"))


def _canvas_index(alone, canvas) -> torch.Tensor:
    """For each anchor of the image's own grid, the index of the anchor at the same point in the canvas grid."""
    out, start_a, start_c = [], 0, 0
    for (ha, wa), (hc, wc) in zip(alone.sizes, canvas.sizes):
        y, x = torch.meshgrid(torch.arange(ha), torch.arange(wa), indexing="ij")
        out.append(start_c + (y * wc + x).reshape(-1))
        start_a, start_c = start_a + ha * wa, start_c + hc * wc
    return torch.cat(out)


def test_mu_two_sigma_ignores_padding():
    h, w = 64, 96
    alone, canvas = _level_grid(h, w), _level_grid(128, 160)
    idx = _canvas_index(alone, canvas)
    assert torch.equal(canvas.points[idx], alone.points)
    gen = torch.Generator().manual_seed(9)
    t_alone = torch.randn(1, len(idx), 3, generator=gen) - 3
    t_alone[0, 5, 1] = 3.0  # a few confident anchors inside the image
    t_alone[0, 40, 2] = 2.0
    # Padding responses: strong (a flat zero-image region often scores high), so they move mean and std.
    t_canvas = torch.randn(2, canvas.points.shape[0], 3, generator=gen) + 1.0
    t_canvas[0, idx] = t_alone[0]
    sizes = torch.tensor([[h, w], [128, 160]])
    valid_c, valid_a = canvas.valid_mask(sizes), alone.valid_mask(torch.tensor([[h, w]]))
    assert torch.equal(valid_c[0, idx], valid_a[0])

    sel_a = confident_mask(t_alone, valid=valid_a)
    sel_c = confident_mask(t_canvas, valid=valid_c)
    assert sel_a[0, 5] and sel_a[0, 40]
    assert torch.equal(sel_c[0, idx], sel_a[0]) and int(sel_c[0].sum()) == int(sel_a[0].sum())  # nothing outside
    assert not torch.equal(confident_mask(t_canvas)[0, idx], sel_a[0])  # statistics over the padding: differ
    assert torch.equal(confident_mask(t_canvas[1:], valid=valid_c[1:]), confident_mask(t_canvas[1:]))  # unpadded image
    # hccd_loss: same selection -> same count and value (student differs from the teacher only inside).
    s_alone = torch.cat([t_alone + 0.5, torch.zeros(1, len(idx), 3)], -1)
    s_canvas = torch.cat([t_canvas[:1].clone(), torch.zeros(1, t_canvas.shape[1], 3)], -1)
    s_canvas[0, idx] = s_alone[0]
    la, na = hccd_loss(s_alone, t_alone, valid=valid_a)
    lc, nc = hccd_loss(s_canvas, t_canvas[:1], valid=valid_c[:1])
    assert na == nc > 0 and torch.allclose(la, lc)

    # ERD box: the same rule on the box logits, then NMS on the same points -> the same kept anchors.
    r_alone = torch.randn(1, len(idx), 4, 17, generator=gen)
    r_alone[0, [7, 30, 61], :, 4] += 6.0
    r_canvas = torch.randn(1, canvas.points.shape[0], 4, 17, generator=gen) + 4.0
    r_canvas[0, idx] = r_alone[0]
    mask_a, mask_c = box_logit_mask(r_alone, valid=valid_a), box_logit_mask(r_canvas, valid=valid_c[:1])
    assert mask_a[0, [7, 30, 61]].all()
    assert torch.equal(mask_c[0, idx], mask_a[0]) and int(mask_c.sum()) == int(mask_a.sum())
    assert not torch.equal(box_logit_mask(r_canvas)[0, idx], mask_a[0])
    s_reg_a = r_alone + 0.3
    s_reg_c = r_canvas.clone()
    s_reg_c[0, idx] = s_reg_a[0]
    la, ka = erd_box_loss(s_alone, s_reg_a, t_alone, r_alone, alone.points, alone.strides, valid=valid_a)
    lc, kc = erd_box_loss(s_canvas, s_reg_c, t_canvas[:1], r_canvas, canvas.points, canvas.strides, valid=valid_c[:1])
    assert ka == kc > 0 and torch.allclose(la, lc)


def test_erd_box_nms_never_crosses_images():
    grid, _ = _grid()
    num = grid.points.shape[0]
    gen = torch.Generator().manual_seed(12)
    t_reg = torch.randn(1, num, 4, 17, generator=gen) * 2
    t_cls = torch.randn(1, num, 3, generator=gen) * 2
    s_cls = torch.randn(1, num, 6, generator=gen)
    s_reg = t_reg + torch.randn(t_reg.shape, generator=gen)
    one, k1 = erd_box_loss(s_cls, s_reg, t_cls, t_reg, grid.points, grid.strides)
    twice = [torch.cat([x, x]) for x in (s_cls, s_reg, t_cls, t_reg)]  # the same image twice in one batch
    two, k2 = erd_box_loss(*twice, grid.points, grid.strides)
    assert k1 > 0 and k2 == 2 * k1 and torch.allclose(two, 2 * one)


# ---- step_loss ----

def _step_inputs(seed: int = 0, boxes=None, labels=None, batch: int = 2, size: int = 128):
    grid = _level_grid(size, size)
    num = grid.points.shape[0]
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, 8, h, w, generator=gen) for h, w in grid.sizes]
    s = DenseOutput((torch.randn(batch, num, 6, generator=gen) - 2).requires_grad_(True),
                    torch.randn(batch, num, 4, 17, generator=gen).requires_grad_(True),
                    [f.clone().requires_grad_(True) for f in feats], grid)
    t = DenseOutput(torch.randn(batch, num, 3, generator=gen) - 2, torch.randn(batch, num, 4, 17, generator=gen),
                    [f + torch.randn(f.shape, generator=gen) for f in feats], grid)
    if boxes is None:  # a small GT (P3 positives) and a large one (coarser levels), new-class labels
        boxes = torch.tensor([[[10.0, 10.0, 30.0, 34.0], [4.0, 2.0, 124.0, 110.0]]]).repeat(batch, 1, 1)
        labels = torch.tensor([[3, 5]]).repeat(batch, 1)
    return s, t, boxes, labels, torch.full((batch, 2), size)


ALL_TERMS = dict(hccd=True, erd_box=True, dscrd=True, idfd=True, hccd_min_score=0.0, kd_mismatch=True)
TRAINED = torch.tensor([False, False, False, True, True, True])


def test_step_loss_log_and_kd_per_level():
    s, t, boxes, labels, sizes = _step_inputs()
    total, log = step_loss(s, t, boxes, labels, sizes, TRAINED, LossConfig(), 2.0, DistillConfig(**ALL_TERMS))
    parts = ["qfl", "giou", "dfl", "hccd", "erd_box", "ld", "vlr", "idfd", "kd"]
    assert set(log) == {"loss", *(f"loss_{p}" for p in parts), "n_pos", "n_hccd", "n_erd_box", "n_ld", "n_vlr", "n_idfd"}
    assert all(v.dim() == 0 and not v.requires_grad for v in log.values())
    assert torch.allclose(log["loss"], sum(log[f"loss_{p}"] for p in parts)) and torch.isfinite(total)
    assert log["n_ld"] == log["n_pos"] > 0
    # kd_mismatch: a mean per FPN level over that level's positives, summed over levels (as released).
    asg = assign_targets(s.grid, boxes, labels)
    levels = [bool(m.any()) for m in asg.pos_mask.split(s.grid.num_per_level, dim=1)]
    assert sum(levels) >= 2
    per_level = kd_mismatch_loss(s.cls, t.cls, asg.pos_mask, NEW, weight=0.25, num_per_level=s.grid.num_per_level)
    pooled = kd_mismatch_loss(s.cls, t.cls, asg.pos_mask, NEW, weight=0.25)
    assert torch.allclose(log["loss_kd"], per_level) and not torch.allclose(per_level, pooled)
    total.backward()
    assert all(torch.isfinite(x.grad).all() for x in [s.cls, s.reg, *s.feats])


def test_dscrd_teacher_iou_switch_reaches_the_step_loss():
    s, t, boxes, labels, sizes = _step_inputs()
    logs = [step_loss(s, t, boxes, labels, sizes, TRAINED, LossConfig(), 2.0,
                      DistillConfig(**ALL_TERMS, dscrd_teacher_iou=on))[1] for on in (False, True)]
    assert 0 < float(logs[1]["loss_ld"]) < float(logs[0]["loss_ld"])
    assert 0 < float(logs[1]["loss_vlr"]) < float(logs[0]["loss_vlr"])
    assert torch.equal(logs[1]["loss_qfl"], logs[0]["loss_qfl"]) and torch.equal(logs[1]["loss_idfd"], logs[0]["loss_idfd"])


def test_step_loss_without_teacher_and_empty_batch():
    s, t, boxes, labels, sizes = _step_inputs()
    total, log = step_loss(s, None, boxes, labels, sizes, TRAINED, LossConfig(), 1.0, None)
    assert set(log) == {"loss", "loss_qfl", "loss_giou", "loss_dfl", "n_pos"}
    total.backward()
    assert float(s.cls.grad[..., :3].abs().sum()) == 0.0  # plain step: old channels untouched
    # No GT in the batch (padding only): every GT-driven term is an exact 0 with a graph to the student.
    s, t, _, _, sizes = _step_inputs(seed=1)
    empty_b, empty_l = torch.zeros(2, 1, 4), torch.full((2, 1), -1)
    total, log = step_loss(s, t, empty_b, empty_l, sizes, TRAINED, LossConfig(), 2.0, DistillConfig(**ALL_TERMS))
    for k in ("loss_giou", "loss_dfl", "loss_ld", "loss_vlr", "loss_idfd", "loss_kd", "n_pos", "n_ld", "n_vlr", "n_idfd"):
        assert log[k].item() == 0.0, k
    assert torch.isfinite(total)
    total.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in [s.cls, s.reg, *s.feats])


def test_no_sync_guard_detects_syncs():
    x = torch.arange(4.0)
    with _NoSync():
        for f in (lambda: bool(x.sum()), lambda: x.sum().item(), lambda: x[x > 1], lambda: float(x[0]), lambda: x.nonzero()):
            with pytest.raises(AssertionError, match="host sync"):
                f()
        assert torch.equal(x[torch.tensor([1, 2])].sum(dim=0, keepdim=True), torch.tensor([3.0]))  # integer indexing is fine


class _NoSync:
    """Makes the host-sync entry points of a tensor raise (CPU stand-in for CUDA's sync debug mode)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "masked_select")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        self.getitem = torch.Tensor.__getitem__

        def fail(name):
            def f(*a, **k):
                raise AssertionError(f"host sync: Tensor.{name}")
            return f

        def getitem(x, key):
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool and k.dim() > 0 for k in keys):
                raise AssertionError("host sync: boolean-mask indexing")
            return self.getitem(x, key)

        for n in self.NAMES:
            setattr(torch.Tensor, n, fail(n))
        torch.Tensor.__getitem__ = getitem
        self.torch_nonzero, torch.nonzero = torch.nonzero, fail("torch.nonzero")
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        torch.Tensor.__getitem__ = self.getitem
        torch.nonzero = self.torch_nonzero


@pytest.mark.parametrize("empty,teacher_iou", [(False, False), (True, False), (False, True), (True, True)])
def test_step_loss_has_no_host_sync_outside_erd_box(empty, teacher_iou):
    s, t, boxes, labels, sizes = _step_inputs(seed=2)
    if empty:
        boxes, labels = torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long)
    cfg = DistillConfig(**{**ALL_TERMS, "erd_box": False, "dscrd_teacher_iou": teacher_iou})
    with _NoSync():
        total, log = step_loss(s, t, boxes, labels, sizes, TRAINED, LossConfig(), 2.0, cfg)
        total.backward()
    assert torch.isfinite(total) and len(log) == 14  # all terms but erd_box, with their counts


def test_hccd_on_scores_is_zero_at_agreement_and_its_gradient_is_bounded_where_l2_is_not():
    """hccd_form='bce' (sdidd+): 0 when student = teacher; a far-negative logit that drifted (a class absent at the
    anchor, probability ~0 either way) pulls with L2's full force but hardly at all on scores."""
    torch.manual_seed(0)
    teacher = torch.full((1, 50, 2), -12.0)
    teacher[0, :5, 0] = 4.0  # five confident anchors of class 0; class 1 is far negative everywhere
    same, _ = hccd_loss(teacher.clone(), teacher, form="bce")
    assert abs(float(same)) < 1e-6
    student = teacher.clone()
    student[0, :5, 1] = -6.0  # the absent class's logit drifted by 6 (probability 6e-6 -> 2.5e-3)
    student.requires_grad_(True)
    grads = {}
    for form in ("l2", "bce"):
        loss, n = hccd_loss(student, teacher, form=form)
        assert float(loss.detach()) > 0 and int(n) == 5
        (g,) = torch.autograd.grad(loss, student)
        grads[form] = g.abs().max().item()
    assert grads["bce"] < grads["l2"] / 100, grads


def test_score_form_hccd_at_8x_weight_pulls_like_l2_where_the_teacher_is_unsure():
    """The ablation sdidd+-hccd-x8 rests on this: σ'(0) = 1/4, so 8 × the score form's gradient equals L2's 2·Δz
    for a small drift at a teacher score of 0.5, and stays far below it at a confident (score 0.98) class."""
    teacher = torch.full((1, 40, 2), -12.0)
    teacher[0, :4, 0] = 0.0   # score 0.5 (an unsure, weak class)
    teacher[0, :4, 1] = 4.0   # score 0.98 at the same anchors
    student = teacher.clone()
    student[0, :4] -= 0.01    # a small drift of both logits
    student.requires_grad_(True)
    g = {form: torch.autograd.grad(hccd_loss(student, teacher, weight=w, form=form)[0], student)[0][0, 0]
         for form, w in (("l2", 1.0), ("bce", 8.0))}
    assert torch.allclose(g["bce"][0], g["l2"][0], rtol=1e-2), g
    assert g["bce"][1].abs() < g["l2"][1].abs() / 5, g


def test_pseudo_label_channels_skip_qfl_where_hccd_distils_them():
    """sdidd+: an old defect that got no pseudo-label is not pushed to 0 by QFL where the teacher is confident."""
    s, t, boxes, labels, sizes = _step_inputs()
    t.cls[0, 7, 1] = 6.0  # the teacher is sure of an old defect at anchor 7 (far from the GT boxes, no label there)
    cfg = DistillConfig(hccd=False, erd_box=False, dscrd=False, idfd=False, hccd_min_score=0.1)
    pseudo = torch.tensor([True, True, True, False, False, False])  # old channels trained on pseudo-labels
    grads = {}
    for ignore in (True, False):
        s.cls.grad = None
        total, _ = step_loss(s, t, boxes, labels, sizes, torch.ones(6, dtype=torch.bool), LossConfig(), 2.0,
                             dataclasses.replace(cfg, pseudo_ignore_confident=ignore), pseudo_channels=pseudo)
        total.backward()
        grads[ignore] = s.cls.grad.clone()
    assert float(grads[False][0, 7, :3].abs().sum()) > 0  # every anchor without a pseudo-label is a negative
    assert float(grads[True][0, 7, :3].abs().sum()) == 0.0  # ...except where HCCD distils the teacher
    assert float(grads[True][0, 7, 3:].abs().sum()) > 0  # the new channels keep their negatives there
    assert float(grads[True][1, 7, :3].abs().sum()) > 0  # and other anchors keep theirs


def test_every_term_of_the_table_runs_alone_and_is_what_switches_the_teachers_forward_on():
    """One entry of distill/terms.py per term: switched on alone it adds its losses, and it alone makes a step read the teacher."""
    from sdidd.distill.terms import TERMS
    from sdidd.methods import uses_teacher
    off = dict(hccd=False, erd_box=False, dscrd=False, idfd=False, hccd_min_score=0.0)
    s, t, boxes, labels, sizes = _step_inputs()
    assert not uses_teacher(DistillConfig(**off))
    for name, term in TERMS.items():
        if term.needs_new_teacher:
            continue  # runs when the new-class teacher's outputs are given (tests/test_new_teacher.py)
        cfg = DistillConfig(**{**off, name: True})
        assert term.enabled(cfg) and uses_teacher(cfg), name
        _, log = step_loss(s, t, boxes, labels, sizes, TRAINED, LossConfig(), 2.0, cfg)
        added = set(log) - {"loss", "loss_qfl", "loss_giou", "loss_dfl", "n_pos"}
        assert added and any(k.startswith("loss_") for k in added), name


def test_a_new_term_is_its_function_plus_one_table_entry_switched_on_by_its_name(monkeypatch):
    """Adding a term = a loss function + one TERMS entry: `distill.terms` turns it on, with its weight, for any method."""
    from sdidd.config import config_from_dict
    from sdidd.distill import terms
    from sdidd.methods import resolved_distill, uses_teacher

    def global_feature_loss(x):  # the "new module": the student's FPN features pulled to the teacher's everywhere
        loss = sum(((s - t.detach()) ** 2).mean() for s, t in zip(x.student.feats, x.teacher.feats))
        return {"global_feature": x.weight("global_feature") * loss}, {}

    monkeypatch.setitem(terms.TERMS, "global_feature", terms.Term("FPN features everywhere", None, global_feature_loss))
    off = dict(hccd=False, erd_box=False, dscrd=False, idfd=False, hccd_min_score=0.0)
    s, t, boxes, labels, sizes = _step_inputs()
    assert not uses_teacher(DistillConfig(**off))
    logs = {}
    for w in (0.5, 1.0):
        cfg = DistillConfig(**off, terms={"global_feature": w})
        assert uses_teacher(cfg)  # the teacher's forward follows the term
        _, logs[w] = step_loss(s, t, boxes, labels, sizes, TRAINED, LossConfig(), 2.0, cfg)
    assert float(logs[0.5]["loss_global_feature"]) > 0
    assert float(logs[1.0]["loss_global_feature"]) == pytest.approx(2 * float(logs[0.5]["loss_global_feature"]))
    # a finetune run (no distillation of its own) with the term named in its config runs it; a typo is one line
    cfg = config_from_dict({"incremental": {"method": "finetune"}, "distill": {"terms": {"global_feature": 0.5}}})
    assert uses_teacher(resolved_distill(cfg, "finetune"))
    with pytest.raises(SdiddError, match="distill.terms.global_featur.*not a term"):
        config_from_dict({"distill": {"terms": {"global_featur": 0.5}}})
    with pytest.raises(SdiddError, match="distill.terms.hccd.*switch of its own"):
        config_from_dict({"distill": {"terms": {"hccd": 0.5}}})
    with pytest.raises(SdiddError, match="distill.terms.*expected a mapping"):
        config_from_dict({"distill": {"terms": 0.5}})


def test_hccd_outside_new_leaves_the_new_boxes_to_the_labels():
    """distill.hccd_outside_new: where the teacher calls a new defect an old one, HCCD no longer copies that; with
    pseudo-labels the old channels there become QFL negatives (the label says "not an old defect")."""
    s, t, boxes, labels, sizes = _step_inputs()
    t.cls[:, :, :] = -8.0
    x, y = s.grid.points[:, 0], s.grid.points[:, 1]
    inside = ((x > 10) & (x < 30) & (y > 10) & (y < 34) & (s.grid.strides == 8)).nonzero().flatten().tolist()
    assert len(inside) == 9  # P3 anchors with centres inside the small new box [10, 10, 30, 34]
    t.cls[:, inside, 1] = 6.0  # the teacher is sure of an old class on the new defect
    pseudo = torch.tensor([True, True, True, False, False, False])
    grads, counts = {}, {}
    for on in (False, True):
        s.cls.grad = None
        cfg = DistillConfig(hccd=True, hccd_form="bce", erd_box=False, dscrd=False, idfd=False, hccd_min_score=0.1,
                            pseudo_ignore_confident=True, hccd_outside_new=on)
        total, log = step_loss(s, t, boxes, labels, sizes, torch.ones(6, dtype=torch.bool), LossConfig(), 2.0, cfg,
                               pseudo_channels=pseudo)
        total.backward()
        grads[on], counts[on] = s.cls.grad.clone(), float(log["n_hccd"])
    assert counts[False] > 0 and counts[True] < counts[False]
    g_off, g_on = grads[False][0, inside, 1], grads[True][0, inside, 1]
    assert (g_off < 0).all()  # HCCD pulls the student's old channel up toward the teacher's score there
    assert (g_on > 0).all()  # now QFL pushes it down: the new box says it is not an old defect
