"""Distillation losses: zero at student == teacher, exact selections, empty-set safety, descent toward the teacher."""
from __future__ import annotations

import math
import statistics

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
from sdidd.model.anchors import make_anchor_grid
from sdidd.model.assigner import anchor_boxes, atss_assign, finegrained_mask, vlr_region

STRIDES = [8, 16, 32, 64, 128]
NEW = slice(3, 6)


def _grid(h: int = 64, w: int = 96):
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    grid = make_anchor_grid(sizes, STRIDES, torch.device("cpu"))
    return grid, anchor_boxes(grid.points, grid.strides)


def _gts():
    return [torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 5.0, 70.0, 60.0]]), torch.tensor([[20.0, 20.0, 90.0, 62.0], [2.0, 1.0, 95.0, 63.0]])]


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
    out = dscrd_loss(s_cls, s_reg, t_reg, anchors, grid.num_per_level, gts, NEW)
    ld_ref, vlr_ref, n_pos, n_vlr = 0.0, 0.0, 0, 0
    for b in range(2):
        res = atss_assign(anchors, grid.num_per_level, gts[b])
        region = vlr_region(anchors, gts[b], res.threshold)
        assert torch.equal(out["pos_mask"][b], res.assigned >= 0)
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
    gts = _gts()
    same = dscrd_loss(s_cls, t_reg.clone(), t_reg, anchors, grid.num_per_level, gts, NEW)
    assert float(same["ld"]) == 0.0 and float(same["vlr"]) == 0.0 and same["n_pos"] > 0
    base = dscrd_loss(s_cls, s_reg, t_reg, anchors, grid.num_per_level, gts, NEW)
    other_old = s_cls.clone()
    other_old[..., :3] = 7.0  # ld weights read the NEW-class channels only
    assert torch.equal(dscrd_loss(other_old, s_reg, t_reg, anchors, grid.num_per_level, gts, NEW)["ld"], base["ld"])

    def total(r):
        o = dscrd_loss(s_cls, r, t_reg, anchors, grid.num_per_level, gts, NEW)
        return o["ld"] + o["vlr"]

    before, after = _descends(total, s_reg, lr=50.0)
    assert 0 < after < before


def test_dscrd_empty_gts():
    grid, anchors, t_reg, s_cls, s_reg = _dscrd_setup()
    s_reg = s_reg.clone().requires_grad_(True)
    out = dscrd_loss(s_cls, s_reg, t_reg, anchors, grid.num_per_level, [torch.zeros(0, 4)] * 2, NEW)
    assert out["n_pos"] == 0 and out["n_vlr"] == 0
    assert out["ld"].item() == 0.0 and out["vlr"].item() == 0.0
    (out["ld"] + out["vlr"]).backward()
    assert torch.isfinite(s_reg.grad).all()
    assert not out["pos_mask"].any()


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
    masks = torch.stack([finegrained_mask(anchors, g) for g in gts])  # [B, A]
    loss, n = idfd_loss([f.clone() for f in t_feats], t_feats, anchors, grid.num_per_level, gts)
    assert loss.item() == 0.0 and n == int(masks.sum()) > 0
    # +1 on masked positions, +100 on unmasked ones: only the masked ones count -> 1 per non-empty level.
    s_feats, nonempty = [], 0
    for f, m in zip(t_feats, masks.split(grid.num_per_level, dim=1)):
        m = m.view(f.shape[0], 1, f.shape[2], f.shape[3]).float()
        s_feats.append(f + m + 100.0 * (1 - m))
        nonempty += int(m.sum() > 0)
    loss, _ = idfd_loss(s_feats, t_feats, anchors, grid.num_per_level, gts, weight=2.0)
    assert nonempty >= 2 and math.isclose(loss.item(), 2.0 * nonempty, rel_tol=1e-6)


def test_idfd_quirk_and_descent():
    grid, anchors = _grid()
    gen = torch.Generator().manual_seed(6)
    t_feats = _feats(grid, gen)
    s_feats = [f + torch.randn(f.shape, generator=gen) for f in t_feats]
    gts = _gts()
    full, _ = idfd_loss(s_feats, t_feats, anchors, grid.num_per_level, gts)
    no_pos = torch.zeros(2, anchors.shape[0], dtype=torch.bool)
    zeroed, _ = idfd_loss(
        s_feats, t_feats, anchors, grid.num_per_level, gts, zero_levels_without_positives=True, pos_masks=no_pos
    )
    assert full.item() > 0 and zeroed.item() == 0.0
    only_p3 = no_pos.clone()
    only_p3[0, 0] = True
    p3_only, _ = idfd_loss(
        s_feats, t_feats, anchors, grid.num_per_level, gts, zero_levels_without_positives=True, pos_masks=only_p3
    )
    p3_alone, _ = idfd_loss(s_feats[:1], t_feats[:1], anchors[: grid.num_per_level[0]], grid.num_per_level[:1], gts)
    assert torch.allclose(p3_only, p3_alone) and p3_only.item() < full.item()

    params = [f.clone().requires_grad_(True) for f in s_feats]
    before = idfd_loss(params, t_feats, anchors, grid.num_per_level, gts)[0]
    before.backward()
    with torch.no_grad():
        stepped = [p - 0.1 * p.grad for p in params]
    after = idfd_loss(stepped, t_feats, anchors, grid.num_per_level, gts)[0]
    assert 0 < after.item() < before.item()


def test_idfd_empty():
    grid, anchors = _grid()
    gen = torch.Generator().manual_seed(7)
    s_feats = [f.requires_grad_(True) for f in _feats(grid, gen)]
    loss, n = idfd_loss(s_feats, _feats(grid, gen), anchors, grid.num_per_level, [torch.zeros(0, 4)] * 2)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(f.grad).all() for f in s_feats)


def test_idfd_normalize_is_scale_invariant():
    """With normalize=True the feature term does not depend on the FPN's feature scale."""
    from sdidd.distill.feature import idfd_loss
    from sdidd.model.anchors import make_anchor_grid
    torch.manual_seed(0)
    grid = make_anchor_grid([(8, 8), (4, 4)], [8, 16], torch.device("cpu"))
    ft = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    fs = [f + 0.1 * torch.randn_like(f) for f in ft]
    gt = [torch.tensor([[10.0, 10.0, 40.0, 30.0]])]
    a, n = idfd_loss(fs, ft, grid.boxes, grid.num_per_level, gt, normalize=True)
    b, _ = idfd_loss([10 * f for f in fs], [10 * f for f in ft], grid.boxes, grid.num_per_level, gt, normalize=True)
    c, _ = idfd_loss([10 * f for f in fs], [10 * f for f in ft], grid.boxes, grid.num_per_level, gt, normalize=False)
    assert n > 0 and a.item() > 0
    assert torch.allclose(a, b, rtol=1e-4)
    d, _ = idfd_loss(fs, ft, grid.boxes, grid.num_per_level, gt, normalize=False)
    assert torch.allclose(c, 100 * d, rtol=1e-4)  # the plain MSE grows with the square of the scale
