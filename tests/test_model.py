"""Detector core: QFL/DFL/GIoU against hand-computed values, box coding, head layout, post-processing."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdidd.data.transforms import pad_targets

from sdidd.engine.incremental import extend_student, freeze_teacher
from sdidd.model.anchors import make_anchor_grid
from sdidd.model.detector import GFL, DetectorConfig
from sdidd.model.assigner import atss_assign
from sdidd.model.gfl_loss import (
    aligned_iou,
    assign_targets,
    distribution_focal_loss,
    gfl_loss,
    giou_loss,
    quality_focal_loss,
)
from sdidd.model.head import bbox2distance, distance2bbox, integral
from torchvision.ops import generalized_box_iou_loss

STRIDES = [8, 16, 32, 64, 128]


def tiny_detector(num_classes: int = 3) -> GFL:
    torch.manual_seed(0)
    return GFL(DetectorConfig(num_classes=num_classes, backbone="tf_efficientnet_lite0", pretrained=False,
                              fpn_channels=32, head_channels=32, head_convs=1))


def test_qfl_hand_values():
    z = torch.zeros(1, 3)  # sigma = 0.5 everywhere
    # target 0: BCE = ln 2, factor 0.5^2 -> 0.25 ln 2 per class
    assert quality_focal_loss(z, torch.zeros(1, 3)).item() == pytest.approx(3 * 0.25 * math.log(2), rel=1e-6)
    # quality target equal to sigma: factor 0 -> no loss on that class
    t = torch.tensor([[0.5, 0.0, 0.0]])
    assert quality_focal_loss(z, t).item() == pytest.approx(2 * 0.25 * math.log(2), rel=1e-6)
    # a confident correct negative costs almost nothing
    assert quality_focal_loss(torch.full((1, 1), -10.0), torch.zeros(1, 1)).item() < 1e-8


def test_dfl_hand_values():
    # probability 0.7 on bin 2 and 0.3 on bin 3, target 2.3: DFL = -(0.7 ln 0.7 + 0.3 ln 0.3)
    logits = torch.full((1, 17), -1e4)
    logits[0, 2], logits[0, 3] = math.log(0.7), math.log(0.3)
    expected = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert distribution_focal_loss(logits, torch.tensor([2.3])).item() == pytest.approx(expected, rel=1e-5)
    # uniform distribution: CE = ln 17 whatever the target
    assert distribution_focal_loss(torch.zeros(1, 17), torch.tensor([7.6])).item() == pytest.approx(math.log(17), rel=1e-6)


def test_giou_and_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    # disjoint unit squares: IoU 0, enclosing area 3, union 2 -> GIoU -1/3 -> loss 4/3
    assert generalized_box_iou_loss(a, b).item() == pytest.approx(4 / 3, rel=1e-6)
    assert aligned_iou(a, torch.tensor([[0.0, 0.0, 2.0, 1.0]])).item() == pytest.approx(0.5)


def test_box_coding_round_trip():
    torch.manual_seed(0)
    points = torch.rand(50, 2) * 100 + 50
    d = torch.rand(50, 4) * 15
    boxes = distance2bbox(points, d)
    assert torch.allclose(bbox2distance(points, boxes, 16.0), d, atol=1e-4)
    # a sharp distribution decodes to its bin
    logits = torch.full((2, 4, 17), -1e4)
    logits[..., 5] = 0
    assert torch.allclose(integral(logits), torch.full((2, 4), 5.0))


def test_anchor_grid_layout():
    g = make_anchor_grid([(2, 3), (1, 2)], [8, 16], torch.device("cpu"))
    assert g.num_per_level == [6, 2]
    assert g.points[:3].tolist() == [[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]]  # row-major, centre offset 0.5
    assert g.boxes[0].tolist() == [-28.0, -28.0, 36.0, 36.0]  # side 8 * stride


def test_detector_shapes_and_postprocess():
    model = tiny_detector(3).eval()
    images = torch.randint(0, 255, (2, 3, 128, 96), dtype=torch.uint8)
    out = model(images)
    a = sum(h * w for h, w in [(16, 12), (8, 6), (4, 3), (2, 2), (1, 1)])
    assert out.cls.shape == (2, a, 3) and out.reg.shape == (2, a, 4, 17)
    assert [f.shape[1] for f in out.feats] == [32] * 5
    # prior-bias init: every score starts near 0.01
    assert out.cls.sigmoid().mean().item() == pytest.approx(0.01, abs=0.005)
    res = model.postprocess(out, [(128, 96), (100, 90)], score_thr=0.0)
    for r, (h, w) in zip(res, [(128, 96), (100, 90)]):
        assert len(r["boxes"]) <= 100
        assert (r["boxes"][:, 2] <= w).all() and (r["boxes"][:, 3] <= h).all()


def test_nms_across_classes_keeps_one_box_per_place():
    """agnostic=True (NMS across classes): two classes firing at one place leave one box, the better-scored class's;
    the ONNX path's numpy post-processing does the same."""
    from sdidd.export import postprocess_onnx_outputs
    model = tiny_detector(3).eval()
    out = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    out.cls.fill_(-20.0)
    out.cls[0, 5, 0], out.cls[0, 5, 2] = 3.0, 2.0  # one anchor: class 0 (score 0.95) and class 2 (0.88) at the same box
    per_class = model.postprocess(out, [(64, 64)])[0]
    across = model.postprocess(out, [(64, 64)], agnostic=True)[0]
    assert sorted(per_class["labels"].tolist()) == [0, 2] and across["labels"].tolist() == [0]
    boxes = distance2bbox(out.grid.points, integral(out.reg[0]) * out.grid.strides[:, None])[None]
    onnx = postprocess_onnx_outputs(boxes.detach().numpy(), out.cls.sigmoid().detach().numpy(), [(64, 64)],
                                    num_per_level=out.grid.num_per_level, agnostic=True, backend="numpy")[0]
    assert onnx["labels"].tolist() == [0]


def test_nms_across_class_groups_drops_a_later_groups_box_under_an_earlier_groups():
    """class_groups (old classes 0, 1 vs new class 2): at one place a new-class box under a higher-scored old-class
    box goes; old boxes under a higher new box stay, two classes of one group both stay (per-class NMS), and so does a
    new box elsewhere; numpy agrees."""
    from sdidd.export import postprocess_onnx_outputs
    from sdidd.model.detector import suppress_across_groups
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 9]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    groups = torch.tensor([0, 0, 1, 1, 1])  # boxes 0, 1 old; 2 new under them; 3 new elsewhere; 4 new above them
    assert suppress_across_groups(boxes, scores, groups, 0.6).tolist() == [True, True, False, True, True]
    assert suppress_across_groups(boxes, scores, torch.zeros(5, dtype=torch.long), 0.6).all()
    model = tiny_detector(3).eval()
    out = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    out.cls.fill_(-20.0)
    out.cls[0, 5, 0], out.cls[0, 5, 1], out.cls[0, 5, 2] = 3.0, 2.5, 2.0  # old 0 and 1 above new 2 at one box
    out.cls[0, 40, 2] = 1.0  # a new-class box elsewhere
    out.reg.fill_(-20.0)
    out.reg[..., 1] = 20.0  # every side one stride from the anchor: small boxes, so anchors 5 and 40 do not overlap
    plain = model.postprocess(out, [(64, 64)])[0]
    grouped = model.postprocess(out, [(64, 64)], class_groups=[0, 0, 1])[0]
    assert sorted(plain["labels"].tolist()) == [0, 1, 2, 2] and sorted(grouped["labels"].tolist()) == [0, 1, 2]
    boxes = distance2bbox(out.grid.points, integral(out.reg[0]) * out.grid.strides[:, None])[None]
    onnx = postprocess_onnx_outputs(boxes.detach().numpy(), out.cls.sigmoid().detach().numpy(), [(64, 64)],
                                    num_per_level=out.grid.num_per_level, class_groups=[0, 0, 1], backend="numpy")[0]
    assert sorted(onnx["labels"].tolist()) == [0, 1, 2]


def test_nms_across_groups_in_blocks_gives_the_whole_matrixs_answer(monkeypatch):
    """The across-groups suppression computed in blocks of rows (bounded memory) keeps exactly what one [N, N] matrix
    keeps, in torch and in numpy, and drops some boxes here so the comparison means something."""
    from sdidd import export
    from sdidd.model import detector
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 8 + torch.rand(60, 2, generator=g) * 8], dim=1)
    scores, groups = torch.rand(60, generator=g), torch.randint(0, 2, (60,), generator=g)
    whole = detector.suppress_across_groups(boxes, scores, groups, 0.3)
    whole_np = export._suppress_across_groups_numpy(boxes.numpy(), scores.numpy(), groups.numpy(), 0.3)
    assert 0 < int((~whole).sum()) < 60 and whole.tolist() == whole_np.tolist()
    monkeypatch.setattr(detector, "ACROSS_GROUPS_BLOCK", 7)
    monkeypatch.setattr(export, "ACROSS_GROUPS_BLOCK", 7)
    assert detector.suppress_across_groups(boxes, scores, groups, 0.3).tolist() == whole.tolist()
    assert export._suppress_across_groups_numpy(boxes.numpy(), scores.numpy(), groups.numpy(), 0.3).tolist() == whole.tolist()


def _positive_iou(model, images, boxes, labels) -> float:
    """Mean IoU between the decoded boxes of the ATSS positives and their GT."""
    with torch.no_grad():
        out = model(images)
        t = assign_targets(out.grid, boxes, labels)
        b, a = t.pos_mask.nonzero(as_tuple=True)
        s = out.grid.strides[a, None]
        pred = distance2bbox(out.grid.points[a], integral(out.reg[b, a]) * s)
        return aligned_iou(pred, t.assigned_boxes[b, a]).mean().item()


def test_gfl_loss_trains_boxes():
    model = tiny_detector(2)
    images = torch.randint(0, 255, (2, 3, 96, 96), dtype=torch.uint8)
    boxes = [torch.tensor([[10.0, 10.0, 50.0, 40.0]]), torch.tensor([[30.0, 20.0, 90.0, 80.0], [5.0, 60.0, 25.0, 90.0]])]
    boxes, labels = pad_targets(boxes, [torch.tensor([0]), torch.tensor([1, 0])])
    trained = torch.ones(2, dtype=torch.bool)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    iou_before = _positive_iou(model, images, boxes, labels)
    for _ in range(12):
        out = model(images)
        parts = gfl_loss(out.cls, out.reg, out.grid, assign_targets(out.grid, boxes, labels), trained)
        loss = parts["qfl"] + parts["giou"] + parts["dfl"]
        assert torch.isfinite(loss) and parts["num_pos"] > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The GIoU/DFL weights are the (still tiny) predicted scores, so boxes improve slowly at first and
    # the weighted GIoU itself grows while scores rise: measure the boxes directly.
    assert _positive_iou(model, images, boxes, labels) > iou_before + 0.02


def test_gfl_loss_without_boxes_is_finite():
    model = tiny_detector(2)
    out = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    asg = assign_targets(out.grid, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.long))
    parts = gfl_loss(out.cls, out.reg, out.grid, asg, torch.ones(2, dtype=torch.bool))
    total = parts["qfl"] + parts["giou"] + parts["dfl"]
    total.backward()
    assert torch.isfinite(total) and parts["giou"].item() == 0.0 and parts["dfl"].item() == 0.0
    assert parts["num_pos"].item() == 0 and parts["qfl"].item() > 0
    # The regression branch stays in the graph (DDP needs a gradient for every parameter), with zeros.
    grad = model.head.gfl_reg.weight.grad
    assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("init", ["prior", "default"])
def test_head_extension_keeps_old_outputs(init):
    teacher = freeze_teacher(tiny_detector(3))
    student = extend_student(teacher, 5, init).eval()
    images = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    t, s = teacher(images), student(images)
    # Old rows are copied exactly; a conv with more output channels may pick another kernel, so
    # allow float rounding (~1e-6), far below anything a loss would notice.
    assert torch.allclose(s.cls[..., :3], t.cls, atol=1e-5, rtol=0) and torch.equal(s.reg, t.reg)
    assert torch.equal(student.head.gfl_cls.weight[:3], teacher.head.gfl_cls.weight)
    new_bias = student.head.gfl_cls.bias[3:]
    if init == "prior":
        assert torch.allclose(new_bias, torch.full((2,), -math.log(99)))
    else:  # PyTorch default init: |b| <= 1/sqrt(fan_in)
        assert new_bias.abs().max() <= 1 / math.sqrt(32 * 9)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in student.parameters())
    assert not student.backbone.body.conv_stem.weight.requires_grad  # frozen stem stays frozen
    assert student.backbone.body.blocks[2][0].conv_pw.weight.requires_grad


# ---- one label space, dense GFL, normalisers, anchor cache ----

def _random_dense(batch: int, h: int, w: int, num_classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    grid = make_anchor_grid([(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES], STRIDES, torch.device("cpu"))
    a = grid.points.shape[0]
    cls = (torch.randn(batch, a, num_classes, generator=gen) - 2).requires_grad_(True)
    reg = torch.randn(batch, a, 4, 17, generator=gen).requires_grad_(True)
    return grid, cls, reg


def _sparse_reference(cls, reg, grid, boxes, labels, trained):
    """The former implementation: per-image ATSS, boolean indexing, sliced channels, torchvision GIoU / CE DFL."""
    channels = trained.nonzero().squeeze(1)  # trained channels, in order; labels re-indexed into them
    sub = cls[..., channels]
    pos_mask, pos_labels, pos_boxes = [], [], []
    for b, l in zip(boxes, labels):
        assigned = atss_assign(grid.boxes, grid.num_per_level, b).assigned
        pos = assigned >= 0
        pos_mask.append(pos)
        pos_labels.append(torch.searchsorted(channels, l[assigned[pos]]))
        pos_boxes.append(b[assigned[pos]])
    pos = torch.stack(pos_mask)
    bi, ai = pos.nonzero(as_tuple=True)
    strides = grid.strides[ai][:, None]
    points = grid.points[ai] / strides
    pred = distance2bbox(points, integral(reg[bi, ai]))
    gt = torch.cat(pos_boxes) / strides
    weights = sub[bi, ai].detach().sigmoid().max(-1).values
    targets = torch.zeros_like(sub)
    targets[bi, ai, torch.cat(pos_labels)] = aligned_iou(pred.detach(), gt)
    qfl = quality_focal_loss(sub, targets).sum() / pos.sum(1).clamp(min=1).sum()
    avg = weights.sum().clamp(min=1)
    giou = (generalized_box_iou_loss(pred, gt, reduction="none") * weights).sum() / avg
    d = bbox2distance(points, gt, 16 - 0.1).reshape(-1)
    logits = reg[bi, ai].reshape(-1, 17)
    left = d.floor().long()
    dfl = F.cross_entropy(logits, left, reduction="none") * (left + 1 - d) + F.cross_entropy(logits, left + 1, reduction="none") * (d - left)
    dfl = (dfl.reshape(-1, 4) * weights[:, None]).sum() / 4.0 / avg
    return {"qfl": qfl, "giou": 2.0 * giou, "dfl": 0.25 * dfl, "num_pos": pos.sum()}


def _grads(loss, inputs):
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def test_gfl_dense_matches_sparse_reference():
    grid, cls, reg = _random_dense(3, 96, 128, 5, seed=0)
    gen = torch.Generator().manual_seed(1)
    boxes, labels = [], []
    for n in (3, 0, 2):  # the middle image has no GT at all
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([128.0, 96.0])
        wh = 6.0 + torch.rand(n, 2, generator=gen) * 60.0
        boxes.append(torch.cat([xy - wh / 2, xy + wh / 2], 1))
        labels.append(torch.randint(2, 5, (n,), generator=gen))
    trained = torch.tensor([False, False, True, True, True])
    pb, pl = pad_targets(boxes, labels)
    new = gfl_loss(cls, reg, grid, assign_targets(grid, pb, pl), trained)
    ref = _sparse_reference(cls, reg, grid, boxes, labels, trained)
    assert int(new["num_pos"]) == int(ref["num_pos"]) > 0
    for k in ("qfl", "giou", "dfl"):
        assert torch.allclose(new[k], ref[k], rtol=1e-5, atol=1e-7), k
        for a, b in zip(_grads(new[k], (cls, reg)), _grads(ref[k], (cls, reg))):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-8), k


def test_label_space_pin_target_channel_and_untrained_channels():
    """Labels are model channels: a GT of label k supervises channel k; untrained channels get no QFL at all."""
    grid, cls, reg = _random_dense(1, 64, 64, 5, seed=2)
    with torch.no_grad():
        cls.fill_(-5.0)  # sigma ~ 0.007, below any IoU target
    trained = torch.tensor([False, False, True, True, True])
    boxes, labels = torch.tensor([[[8.0, 8.0, 56.0, 50.0]]]), torch.tensor([[3]])
    asg = assign_targets(grid, boxes, labels)
    pos = asg.pos_mask[0]
    assert pos.any() and torch.equal(asg.assigned_labels[0][pos], torch.full((int(pos.sum()),), 3))
    qfl = gfl_loss(cls, reg, grid, asg, trained)["qfl"]
    (grad,) = torch.autograd.grad(qfl, cls)
    g = grad[0]
    assert torch.equal(g[:, :2], torch.zeros_like(g[:, :2]))  # old channels: exactly no gradient
    # A positive target (IoU > sigma) pulls channel 3 up at the positives; trained channels with target 0
    # push down everywhere, including channel 3 off the positives.
    assert (g[pos, 3] < 0).all() and (g[~pos, 3] > 0).all()
    assert (g[:, [2, 4]] > 0).all()
    # The same GT as label 4 moves the target to channel 4.
    g4 = torch.autograd.grad(gfl_loss(cls, reg, grid, assign_targets(grid, boxes, torch.tensor([[4]])), trained)["qfl"], cls)[0][0]
    assert (g4[pos, 4] < 0).all() and (g4[pos, 3] > 0).all()


def test_qfl_normaliser_sums_max_pos_per_image():
    """QFL / Σ_img max(#pos_img, 1): an image without positives still counts 1 (mmdetection GFL)."""
    grid, cls, reg = _random_dense(2, 64, 64, 2, seed=3)
    trained = torch.ones(2, dtype=torch.bool)
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 50.0]], [[0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1], [-1]])  # image 1: padding only
    both = gfl_loss(cls, reg, grid, assign_targets(grid, boxes, labels), trained)
    alone = gfl_loss(cls[:1], reg[:1], grid, assign_targets(grid, boxes[:1], labels[:1]), trained)
    n = int(alone["num_pos"])
    assert n > 1 and int(both["num_pos"]) == n
    empty_sum = quality_focal_loss(cls[1], torch.zeros_like(cls[1])).sum()
    expected = (alone["qfl"] * n + empty_sum) / (n + 1)
    assert torch.allclose(both["qfl"], expected, rtol=1e-5)
    assert not torch.allclose(both["qfl"], (alone["qfl"] * n + empty_sum) / n, rtol=1e-3)
    # GIoU and DFL: normalised by the positives' weights, which the empty image does not change.
    assert torch.allclose(both["giou"], alone["giou"], rtol=1e-5) and torch.allclose(both["dfl"], alone["dfl"], rtol=1e-5)


def test_giou_loss_matches_torchvision():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(200, 2, generator=gen) * 50
    b = torch.rand(200, 2, generator=gen) * 50
    p = torch.cat([a, a + torch.rand(200, 2, generator=gen) * 30], 1)
    q = torch.cat([b, b + torch.rand(200, 2, generator=gen) * 30], 1)
    assert torch.allclose(giou_loss(p, q), generalized_box_iou_loss(p, q), atol=1e-6)
    assert giou_loss(torch.zeros(4), torch.zeros(4)).isfinite()  # degenerate boxes: no NaN


def test_anchor_grid_cache_identity():
    sizes, dev = [(4, 5), (2, 3)], torch.device("cpu")
    g = make_anchor_grid(sizes, [8, 16], dev)
    assert make_anchor_grid([(4, 5), (2, 3)], [8, 16], dev) is g
    assert g.boxes is g.boxes  # computed once, not per access
    assert make_anchor_grid([(4, 6), (2, 3)], [8, 16], dev) is not g
    with torch.inference_mode():
        h = make_anchor_grid([(3, 3)], [8], dev)
    assert not h.points.is_inference() and not h.boxes.is_inference()  # usable by training afterwards
    valid = g.valid_mask(torch.tensor([[32, 20], [8, 40]]))  # (h, w) per image
    assert torch.equal(valid, (g.points[None, :, 0] < torch.tensor([[20], [40]])) & (g.points[None, :, 1] < torch.tensor([[32], [8]])))
