"""Detector core: QFL/DFL/GIoU against hand-computed values, box coding, head layout, post-processing."""
import math

import pytest
import torch

from sdidd.engine.incremental import extend_student, freeze_teacher
from sdidd.model.anchors import make_anchor_grid
from sdidd.model.detector import GFL, DetectorConfig
from sdidd.model.gfl_loss import aligned_iou, assign_targets, distribution_focal_loss, gfl_loss, quality_focal_loss
from sdidd.model.head import bbox2distance, distance2bbox, integral
from torchvision.ops import generalized_box_iou_loss


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


def _positive_iou(model, images, boxes, labels) -> float:
    """Mean IoU between the decoded boxes of the ATSS positives and their GT."""
    with torch.no_grad():
        out = model(images)
        t = assign_targets(out.grid, boxes, labels)
        b, a = t.pos_mask.nonzero(as_tuple=True)
        s = out.grid.strides[a, None]
        pred = distance2bbox(out.grid.points[a], integral(out.reg[b, a]) * s)
        return aligned_iou(pred, t.boxes).mean().item()


def test_gfl_loss_trains_boxes():
    model = tiny_detector(2)
    images = torch.randint(0, 255, (2, 3, 96, 96), dtype=torch.uint8)
    boxes = [torch.tensor([[10.0, 10.0, 50.0, 40.0]]), torch.tensor([[30.0, 20.0, 90.0, 80.0], [5.0, 60.0, 25.0, 90.0]])]
    labels = [torch.tensor([0]), torch.tensor([1, 0])]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    iou_before = _positive_iou(model, images, boxes, labels)
    for _ in range(12):
        out = model(images)
        parts = gfl_loss(out.cls, out.reg, out.grid, assign_targets(out.grid, boxes, labels))
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
    parts = gfl_loss(out.cls, out.reg, out.grid, assign_targets(out.grid, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)]))
    total = parts["qfl"] + parts["giou"] + parts["dfl"]
    total.backward()
    assert torch.isfinite(total) and parts["giou"].item() == 0.0


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
