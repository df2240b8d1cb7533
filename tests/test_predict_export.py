"""Deploy: `sdidd predict` (drawn images + COCO-results JSON in original pixels), ONNX export parity, one-line errors."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import real_data_root
from sdidd.cli import main
from sdidd.config import Config, replaced
from sdidd.data.records import read_image
from sdidd.data.transforms import EvalTransform
from sdidd.engine.checkpoint import load_checkpoint, save_checkpoint
from sdidd.engine.build import detector_config
from sdidd.engine.checkpoint import model_from_checkpoint
from sdidd.export import POSTPROCESS, STRIDES, export_onnx, letterbox, postprocess_onnx_outputs
from sdidd.model import detector as det_mod
from sdidd.model.head import distance2bbox, integral
from sdidd.predict import run_predict

torch.set_num_threads(1)
CLASSES = ["scratch", "spot", "patch"]
TEST_SIZE, MAX_SIZE = 96, 160  # every predict input below resizes to 96 x 160: no padding, so batching changes nothing
SCORE_ATOL, BOX_ATOL = 1e-4, 1e-2  # ONNX vs PyTorch: sigmoid scores, and boxes in input pixels


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init checkpoint with the fields the trainer writes (optimizer state aside)."""
    torch.manual_seed(0)
    cfg = replaced(Config(), {"data.test_size": TEST_SIZE, "data.max_size": MAX_SIZE, "data.train_sizes": [TEST_SIZE],
                              "model.pretrained": False, "model.fpn_channels": 32, "model.head_channels": 32,
                              "model.head_convs": 1})
    model = det_mod.build_detector(detector_config(cfg, len(CLASSES)))
    # A fresh head scores every anchor at its 0.01 prior and draws same-size boxes: spread both so there is something to match.
    with torch.no_grad():
        nn.init.normal_(model.head.gfl_cls.weight, std=0.1)
        model.head.gfl_cls.bias.fill_(-1.0)
        nn.init.normal_(model.head.gfl_reg.weight, std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    save_checkpoint({"model": model.state_dict(), "detector": model.cfg.__dict__ | {"num_classes": len(CLASSES)},
                     "classes": CLASSES, "new_classes": CLASSES, "step": 0, "method": "joint", "config": cfg.to_dict(),
                     "epoch": 1, "iteration": 1}, path)
    return path


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth background with a few dark and bright blobs (defect-like), HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 120 + 40 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy)
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.05, 0.2) * min(h, w)
        img = img + rng.choice([-90, 90]) * (((np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2) < r * r)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def test_predict_writes_images_and_json_in_original_pixels(ckpt: Path, tmp_path: Path) -> None:
    src, other, out = tmp_path / "in", tmp_path / "other", tmp_path / "out"
    src.mkdir(), other.mkdir()
    # (h, w) all resize to 96 x 160 with the checkpoint's 96 / 160; scales 0.64, 0.32, 1, 0.5.
    Image.fromarray(_picture(150, 250, 1)).save(src / "a.png")
    Image.fromarray(_picture(300, 500, 2)).save(src / "b.bmp")
    Image.fromarray(_picture(96, 160, 3)).save(src / "c.tif")
    Image.fromarray(_picture(192, 320, 4)).save(other / "a.png")  # same name as in src: written as a_1.png
    (src / "notes.txt").write_text("not an image")
    results = run_predict(ckpt, [src, other / "a.png"], out, score_thr=0.3, batch_size=2, device="cpu")

    doc = json.loads((out / "predictions.json").read_text())
    assert doc["categories"] == [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    assert [(i["file_name"], i["height"], i["width"]) for i in doc["images"]] == [
        ("a.png", 150, 250), ("b.bmp", 300, 500), ("c.tif", 96, 160), ("a_1.png", 192, 320)]
    assert [r["image_id"] for r in results] == [i["id"] for i in doc["images"]] == [1, 2, 3, 4]
    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    transform = EvalTransform(TEST_SIZE, MAX_SIZE)
    total = 0
    for info in doc["images"]:
        dets = [d for d in doc["detections"] if d["image_id"] == info["id"]]
        assert all(d["file_name"] == info["file_name"] for d in dets)
        # Oracle: the detector on the evaluation-resized image, boxes scaled back by original / resized size.
        image, tgt = transform(read_image(info["path"]), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "image_id": 0})
        assert tuple(image.shape[-2:]) == (96, 160)
        ref = model.predict(image[None], [(96, 160)], score_thr=0.3)[0]
        ref_xyxy = ref["boxes"] * torch.tensor([info["width"] / 160, info["height"] / 96] * 2)
        got = np.array([d["bbox"] for d in dets], np.float32).reshape(-1, 4)
        got_xyxy = np.concatenate([got[:, :2], got[:, :2] + got[:, 2:]], 1)
        assert len(dets) == len(ref["scores"])
        np.testing.assert_allclose(got_xyxy, ref_xyxy.numpy(), atol=0.02)
        np.testing.assert_allclose([d["score"] for d in dets], ref["scores"].numpy(), atol=1e-5)
        assert [d["category_id"] for d in dets] == (ref["labels"] + 1).tolist()
        assert (got_xyxy >= 0).all() and (got_xyxy[:, [0, 2]] <= info["width"]).all() and (got_xyxy[:, [1, 3]] <= info["height"]).all()
        drawn = np.asarray(Image.open(out / info["file_name"]).convert("RGB"))
        assert drawn.shape == (info["height"], info["width"], 3)
        if dets:
            assert not np.array_equal(drawn, read_image(info["path"]).permute(1, 2, 0).numpy())  # boxes were drawn
        total += len(dets)
    assert total >= 4  # the test means something only with detections
    big = np.array([d["bbox"] for d in doc["detections"] if d["image_id"] == 2]).reshape(-1, 4)
    assert (big[:, 0] + big[:, 2]).max() > 160  # 500-px-wide image: boxes reach past the resized width


def test_postprocess_constants_are_the_detector_s() -> None:
    defaults = {k: p.default for k, p in inspect.signature(det_mod.GFL.postprocess).parameters.items() if k in POSTPROCESS}
    assert defaults == POSTPROCESS and tuple(det_mod.STRIDES) == STRIDES


def _parity_images() -> list[np.ndarray]:
    """Up to 3 NEU-DET test images when the data is there, else synthetic ones; plus one non-square (padded) image."""
    folder = real_data_root() / "NEU-DET" / "IMAGES"
    test = [f for f in sorted(folder.glob("*.jpg")) if f.stem.rsplit("_", 1)[-1].isdigit() and int(f.stem.rsplit("_", 1)[1]) % 5 == 0]
    files = test[:: max(1, len(test) // 3)][:3]  # spread over the classes (files are sorted by class)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files] or [_picture(200, 200, s) for s in (5, 6, 7)]
    return images + [_picture(120, 200, 8)]


def test_onnx_matches_pytorch(ckpt: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    path = export_onnx(ckpt, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == CLASSES and meta["input_size"] == "96"  # test size 96, already a multiple of 32
    images = _parity_images()
    pre = [letterbox(im, 96) for im in images]
    x = np.stack([p for p, _, _ in pre])  # batch 4 through a graph traced at batch 2: the batch dimension is dynamic
    sizes = [hw for _, hw, _ in pre]
    assert sizes[-1] == (58, 96)  # the non-square image is padded below
    boxes, scores = sess.run(["boxes", "scores"], {"images": x})

    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    ref_scores = out.cls.sigmoid().numpy()
    ref_boxes = distance2bbox(out.grid.points, integral(out.reg) * out.grid.strides[:, None]).numpy()
    assert boxes.shape == ref_boxes.shape and scores.shape == ref_scores.shape == (4, out.grid.points.shape[0], len(CLASSES))
    score_err, box_err = np.abs(scores - ref_scores).max(), np.abs(boxes - ref_boxes).max()
    print(f"ONNX vs PyTorch: max |score diff| {score_err:.2e}, max |box diff| {box_err:.2e} px")
    assert score_err <= SCORE_ATOL and box_err <= BOX_ATOL

    ref = model.postprocess(out, sizes)  # the detector's own post-processing
    for backend in ("torch", "numpy"):
        got = postprocess_onnx_outputs(boxes, scores, sizes, backend=backend)
        for g, r in zip(got, ref):
            assert len(g["scores"]) == len(r["scores"]) > 0
            np.testing.assert_array_equal(g["labels"], r["labels"].numpy())
            np.testing.assert_allclose(g["scores"], r["scores"].numpy(), atol=SCORE_ATOL)
            np.testing.assert_allclose(g["boxes"], r["boxes"].numpy(), atol=BOX_ATOL)
    scaled = postprocess_onnx_outputs(boxes, scores, sizes, scales=[s for _, _, s in pre])
    sx, sy = pre[-1][2]
    np.testing.assert_allclose(scaled[-1]["boxes"] * [sx, sy, sx, sy], got[-1]["boxes"], rtol=1e-5, atol=1e-3)
    assert scaled[-1]["boxes"][:, 2].max() <= 200 + 1e-3 and scaled[-1]["boxes"][:, 3].max() <= 120 + 1e-3


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def test_cli_errors_are_one_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    rc, err = _run(["predict", str(ckpt), str(tmp_path / "nope.jpg"), "--out", out], capsys)
    assert rc == 2 and len(err) == 1 and "nope.jpg: input not found" in err[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    rc, err = _run(["predict", str(ckpt), str(empty), "--out", out], capsys)
    assert rc == 2 and len(err) == 1 and "empty: folder holds no images" in err[0]

    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(_picture(64, 64, 0)).save(bad / "ok.jpg")
    data = (bad / "ok.jpg").read_bytes()
    (bad / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    rc, err = _run(["predict", str(ckpt), str(bad), "--out", out, "--device", "cpu"], capsys)
    assert rc == 2 and len(err) == 1 and "cut.jpg: cannot read image" in err[0]
    # The truncated file loses nothing else: the good image is still drawn and listed, the bad one named.
    doc = json.loads((Path(out) / "predictions.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == ["ok.jpg"] and (Path(out) / "ok.jpg").is_file()
    assert len(doc["skipped"]) == 1 and doc["skipped"][0]["path"].endswith("cut.jpg")

    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(2)}, foreign)
    rc, err = _run(["predict", str(foreign), str(bad / "ok.jpg"), "--out", out], capsys)
    assert rc == 2 and len(err) == 1 and "foreign.pth: not an sdidd checkpoint" in err[0]

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    rc, err = _run(["export", str(ckpt), "--out", str(tmp_path / "m.onnx")], capsys)
    assert rc == 2 and len(err) == 1 and 'pip install "sdidd[onnx]"' in err[0]


def test_predict_agnostic_keeps_at_most_the_per_class_boxes(ckpt: Path, tmp_path: Path) -> None:
    """`--agnostic` (NMS across classes) passes through to the detector: never more boxes than per-class NMS."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_picture(96, 160, 5)).save(src / "a.png")
    per_class = run_predict(ckpt, [src], tmp_path / "p", score_thr=0.05, device="cpu")
    across = run_predict(ckpt, [src], tmp_path / "q", score_thr=0.05, device="cpu", agnostic=True)
    assert len(across[0]["scores"]) <= len(per_class[0]["scores"])


def test_predict_old_new_leaves_no_new_box_under_a_better_old_one(ckpt: Path, tmp_path: Path) -> None:
    """`--old-new` on an incremental checkpoint: no kept box of the added class overlaps a higher-scored old-class box
    (IoU > 0.6), which per-class NMS leaves; a checkpoint of one step is refused in one line."""
    from torchvision.ops import box_iou
    from sdidd.errors import SdiddError
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_picture(96, 160, 5)).save(src / "a.png")
    state = load_checkpoint(ckpt)
    step1 = tmp_path / "step1.pth"
    save_checkpoint({**state, "new_classes": ["patch"], "step": 1, "method": "sdidd"}, step1)

    def beaten(r: dict) -> int:  # new-class boxes under a higher-scored old-class box
        b, s, new = torch.as_tensor(r["boxes"]), torch.as_tensor(r["scores"]), torch.as_tensor(r["labels"]) == 2
        pairs = (box_iou(b, b) > 0.6) & new[:, None] & ~new[None, :] & (s[None, :] > s[:, None])
        return int(pairs.any(1).sum())

    per_class = run_predict(step1, [src], tmp_path / "p", score_thr=0.05, device="cpu")
    grouped = run_predict(step1, [src], tmp_path / "q", score_thr=0.05, device="cpu", old_new=True)
    assert beaten(per_class[0]) > 0 and beaten(grouped[0]) == 0
    with pytest.raises(SdiddError, match="has no old classes"):
        run_predict(ckpt, [src], tmp_path / "r", device="cpu", old_new=True)

    # A step evaluated with incremental.old_new_nms: predict does the same by default (--no-old-new turns it off), and
    # the ONNX model's metadata carries the class groups for postprocess_onnx_outputs.
    config = {**state["config"], "incremental": {**state["config"]["incremental"], "old_new_nms": True}}
    step1_nms = tmp_path / "step1_nms.pth"
    save_checkpoint({**state, "new_classes": ["patch"], "step": 1, "method": "sdidd", "config": config}, step1_nms)
    assert beaten(run_predict(step1_nms, [src], tmp_path / "s", score_thr=0.05, device="cpu")[0]) == 0
    assert beaten(run_predict(step1_nms, [src], tmp_path / "t", score_thr=0.05, device="cpu", old_new=False)[0]) > 0
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    sess = ort.InferenceSession(str(export_onnx(step1_nms, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    assert json.loads(sess.get_modelmeta().custom_metadata_map["postprocess"])["class_groups"] == [0, 0, 1]
