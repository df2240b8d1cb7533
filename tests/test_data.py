"""Data layer tests that need no real dataset: synthetic data, transforms, collate, loaders' errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdidd.data import (
    DetectionDataset,
    EvalTransform,
    Record,
    TrainTransform,
    build_dataset,
    collate,
    resolve_data_root,
)
from sdidd.data.coco_json import load_coco_json
from sdidd.data.deeppcb import load_deeppcb
from sdidd.data.neu_det import load_neu_det
from sdidd.data.synthetic import SYNTHETIC_CLASSES, load_synthetic
from sdidd.errors import SdiddError

# ----------------------------------------------------------------------------- helpers


def _voc(name_boxes: list[tuple[str, tuple[int, int, int, int]]], w: int = 40, h: int = 40) -> str:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in name_boxes
    )
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>1</depth></size>{objs}</annotation>"


def make_neu(root: Path, items: dict[str, list[tuple[str, tuple[int, int, int, int]]]], size: int = 40) -> Path:
    """A tiny NEU-DET-like folder: one gray JPEG + one VOC XML per stem."""
    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    for i, (stem, objs) in enumerate(items.items()):
        Image.fromarray(np.full((size, size), 40 + i, np.uint8)).save(root / "IMAGES" / f"{stem}.jpg")
        (root / "ANNOTATIONS" / f"{stem}.xml").write_text(_voc(objs, size, size))
    return root


def make_pcb(root: Path, ann: dict[str, str], test_ids: tuple[str, ...] = ()) -> Path:
    """A tiny DeepPCB-like folder (group00001) with the given annotation texts per id."""
    g = root / "PCBData" / "group00001"
    (g / "00001").mkdir(parents=True)
    (g / "00001_not").mkdir()
    lines = {"trainval": [], "test": []}
    for pid, text in ann.items():
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(g / "00001" / f"{pid}_test.jpg")
        (g / "00001_not" / f"{pid}.txt").write_text(text)
        split = "test" if pid in test_ids else "trainval"
        lines[split].append(f"group00001/00001/{pid}.jpg group00001/00001_not/{pid}.txt")
    for split, ls in lines.items():
        (root / "PCBData" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return root


@pytest.fixture(scope="module")
def syn_train() -> DetectionDataset:
    return load_synthetic("train", num_images=40)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_split_dependent(syn_train: DetectionDataset) -> None:
    again = load_synthetic("train", num_images=8)
    for i in range(8):
        a, ta = syn_train[i]
        b, tb = again[i]
        assert torch.equal(a, b)
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    test = load_synthetic("test", num_images=8)
    assert not any(torch.equal(syn_train[i][0], test[i][0]) for i in range(8))
    other_seed = load_synthetic("train", num_images=2, seed=1)
    assert not torch.equal(syn_train[0][0], other_seed[0][0])


def test_synthetic_classes_boxes_and_cooccurrence(syn_train: DetectionDataset) -> None:
    assert syn_train.classes == ["scratch", "spot", "patch", "crack"] == SYNTHETIC_CLASSES
    multi = 0
    for i, r in enumerate(syn_train.records):
        assert r.file == f"synthetic://train/{i:06d}" and r.image_id == i + 1
        assert r.width == r.height == 160
        assert 1 <= len(r.labels) <= 4
        b = r.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 160).all() and (b[:, 3] <= 160).all()
        assert (np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= 4).all()
        assert set(r.labels.tolist()) <= {0, 1, 2, 3}
        multi += len(set(r.labels.tolist())) >= 2
    assert multi >= 10  # old and new classes must share images
    counts = syn_train.class_counts()
    assert all(n > 0 for n in counts.values())
    img, t = syn_train[0]
    assert img.shape == (3, 160, 160) and img.dtype == torch.uint8
    assert torch.equal(img[0], img[1])  # gray replicated


def test_synthetic_boxes_hold_the_defect(syn_train: DetectionDataset) -> None:
    # Pixels inside boxes deviate from the image's background level more than pixels outside.
    inside, outside = [], []
    for i in range(10):
        img = syn_train[i][0][0].float()
        med = img.median()
        m = torch.zeros_like(img, dtype=torch.bool)
        for x1, y1, x2, y2 in syn_train.records[i].boxes.astype(int):
            m[y1:y2, x1:x2] = True
        dev = (img - med).abs()
        inside.append(dev[m].mean())
        outside.append(dev[~m].mean())
    assert torch.stack(inside).mean() > 1.3 * torch.stack(outside).mean()


def test_synthetic_is_deterministic_and_a_prefix() -> None:
    small = load_synthetic("test", num_images=3, image_size=96, seed=5)
    large = load_synthetic("test", num_images=5, image_size=96, seed=5)
    for i in range(3):
        assert torch.equal(small[i][0], large[i][0])
        np.testing.assert_array_equal(small.records[i].boxes, large.records[i].boxes)
    assert small[0][0].shape == (3, 96, 96)


# ----------------------------------------------------------------------------- transforms / collate


def _boxed_image() -> tuple[torch.Tensor, dict]:
    img = torch.zeros(3, 100, 200, dtype=torch.uint8)
    img[:, 20:60, 10:50] = 255  # the box's content, so alignment can be checked on pixels
    t = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([2]), "image_id": 7}
    return img, t


def test_resize_doubles_boxes_and_keeps_pixels_aligned() -> None:
    img, t = _boxed_image()
    out, tt = EvalTransform(200, 1000)(img, t)
    assert out.shape == (3, 200, 400)
    torch.testing.assert_close(tt["boxes"], torch.tensor([[20.0, 40.0, 100.0, 120.0]]))
    assert tt["scale"] == 2.0 and tt["orig_size"] == (100, 200) and tt["image_id"] == 7
    x1, y1, x2, y2 = tt["boxes"][0].int().tolist()
    assert out[0, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].min() == 255
    assert out[0, y2 + 2 :, :].max() == 0 and out[0, :, x2 + 2 :].max() == 0


def test_max_size_caps_long_side() -> None:
    img, t = _boxed_image()
    out, tt = EvalTransform(200, 300)(img, t)
    assert out.shape == (3, 150, 300) and tt["scale"] == 1.5
    torch.testing.assert_close(tt["boxes"], torch.tensor([[15.0, 30.0, 75.0, 90.0]]))


def test_flip_mirrors_x() -> None:
    img, t = _boxed_image()
    out, tt = TrainTransform([100], 1000, flip_prob=1.0)(img, t)
    assert torch.equal(out, img.flip(-1))
    torch.testing.assert_close(tt["boxes"], torch.tensor([[150.0, 20.0, 190.0, 60.0]]))
    same, ts = TrainTransform([100], 1000, flip_prob=0.0)(img, t)
    assert torch.equal(same, img) and torch.equal(ts["boxes"], t["boxes"])


def test_train_transform_multiscale_and_tiny_boxes_dropped() -> None:
    img = torch.zeros(3, 100, 100, dtype=torch.uint8)
    t = {"boxes": torch.tensor([[10.0, 10.0, 11.5, 40.0], [20.0, 20.0, 60.0, 60.0]]),
         "labels": torch.tensor([0, 1]), "image_id": 1}
    tr = TrainTransform([50, 80], 1000, flip_prob=0.5)
    torch.manual_seed(0)
    sizes = {tr(img, t)[0].shape[-1] for _ in range(20)}
    assert sizes == {50, 80}
    out, tt = EvalTransform(50, 1000)(img, t)  # the 1.5 px box becomes 0.75 px
    assert tt["labels"].tolist() == [1] and tt["boxes"].shape == (1, 4)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 2}
    assert EvalTransform(50, 1000)(img, empty)[1]["boxes"].shape == (0, 4)


def test_collate_pads_to_multiple_of_32() -> None:
    a = torch.full((3, 100, 130), 7, dtype=torch.uint8)
    b = torch.full((3, 90, 70), 9, dtype=torch.uint8)
    ta = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 3, "scale_xy": (0.5, 0.25)}
    tb = {"boxes": torch.ones(1, 4), "labels": torch.ones(1, dtype=torch.int64), "image_id": 4}
    batch = collate([(a, ta), (b, tb)])
    im = batch["images"]
    assert im.shape == (2, 3, 128, 160) and im.dtype == torch.uint8
    assert (im[0, :, :100, :130] == 7).all() and im[0, :, 100:].sum() == 0 and im[0, :, :, 130:].sum() == 0
    assert (im[1, :, :90, :70] == 9).all() and im[1, :, 90:].sum() == 0 and im[1, :, :, 70:].sum() == 0
    assert batch["image_sizes"] == [(100, 130), (90, 70)]
    assert batch["scales"] == [(0.5, 0.25), (1.0, 1.0)] and batch["image_ids"] == [3, 4]
    assert batch["targets"][1] is tb
    # GT padded to the batch's largest count: -1 labels mark padding, sizes mark each image's unpadded region.
    assert batch["boxes"].shape == (2, 1, 4) and batch["labels"].tolist() == [[-1], [1]]
    assert torch.equal(batch["boxes"][1], torch.ones(1, 4)) and batch["sizes"].tolist() == [[100, 130], [90, 70]]
    exact = collate([(torch.zeros(3, 64, 96, dtype=torch.uint8), ta)])
    assert exact["images"].shape == (1, 3, 64, 96)


def test_dataset_transform_end_to_end(syn_train: DetectionDataset) -> None:
    ds = syn_train.with_records(syn_train.records)
    ds.transform = EvalTransform(320, 640)
    img, t = ds[0]
    assert img.shape == (3, 320, 320)
    torch.testing.assert_close(t["boxes"], torch.from_numpy(syn_train.records[0].boxes) * 2)
    assert syn_train.transform is None


# ----------------------------------------------------------------------------- subset


def test_channel_view_labels_boxes_with_their_model_channel(syn_train: DetectionDataset) -> None:
    """One label space: a step with channels (scratch, spot, patch, crack) training patch and crack keeps only
    those boxes, labelled 2 and 3 (their channel), and the pixels follow the record."""
    from sdidd.engine.run_data import channel_view
    sub = channel_view(syn_train, ["scratch", "spot", "patch", "crack"], keep=["patch", "crack"])
    assert sub.classes == ["scratch", "spot", "patch", "crack"] and type(sub) is type(syn_train)
    originals = {r.image_id: r for r in syn_train.records}
    expected = [r.image_id for r in syn_train.records if np.isin(r.labels, [2, 3]).any()]
    assert [r.image_id for r in sub.records] == expected and 0 < len(sub) < len(syn_train)
    for r in sub.records:
        o = originals[r.image_id]
        keep = np.isin(o.labels, [2, 3])
        np.testing.assert_array_equal(r.labels, o.labels[keep])
        np.testing.assert_array_equal(r.boxes, o.boxes[keep])
    j = next(i for i, r in enumerate(sub.records) if r.image_id != i + 1)
    assert torch.equal(sub[j][0], syn_train[sub.records[j].image_id - 1][0])
    # Another channel order relabels: crack first, then spot.
    swapped = channel_view(syn_train, ["crack", "spot"], keep_empty=True)
    assert len(swapped) == len(syn_train)
    for r, o in zip(swapped.records, syn_train.records):
        m = np.isin(o.labels, [3, 1])
        np.testing.assert_array_equal(r.labels, np.where(o.labels[m] == 3, 0, 1))
    # A channel the dataset lacks has no boxes (an old class in a new-class dataset); training it is an error.
    assert len(channel_view(syn_train, ["dent", "crack"], keep_empty=True).records) == len(syn_train)
    with pytest.raises(SdiddError, match="'dent' is not in the dataset"):
        channel_view(syn_train, ["crack", "dent"], keep=["dent"])


def test_only_images_of_reads_every_label_from_the_full_split(syn_train: DetectionDataset) -> None:
    """A view that dropped the crack boxes still loses the images holding a crack: the labels come from the full split."""
    from sdidd.engine.run_data import channel_view, only_images_of
    view = channel_view(syn_train, ["scratch", "spot"], keep_empty=True)  # crack / patch boxes dropped, images kept
    kept = only_images_of(view, syn_train, {"scratch", "spot"})
    expected = [r.image_id for r in syn_train.records if np.isin(r.labels, [0, 1]).all()]  # background images too
    assert [r.image_id for r in kept.records] == expected and 0 < len(kept) < len(view)
    assert kept.classes == view.classes and all(len(r.labels) == 0 or r.labels.max() < 2 for r in kept.records)
    assert len(only_images_of(view, syn_train, set(syn_train.classes))) == len(view)


def test_summary_and_record_types() -> None:
    r = Record(1, "/x.jpg", 10, 10, [[0, 0, 5, 5], [1, 1, 2, 2]], [0, 1])
    assert r.boxes.dtype == np.float32 and r.labels.dtype == np.int64
    ds = DetectionDataset(["a", "b"], [r, Record(2, "/y.jpg", 10, 10)])
    s = ds.summary()
    assert "2 images, 2 boxes" in s and "a" in s and "b" in s
    assert ds.class_counts() == {"a": 1, "b": 1}


# ----------------------------------------------------------------------------- NEU-DET loader


def test_neu_loader_split_ids_and_voc_conversion(tmp_path: Path) -> None:
    items = {f"patches_{n}": [("patches", (1, 1, 10, 20))] for n in range(1, 7)}
    items["scratches_5"] = [("inclusion", (5, 6, 40, 40)), ("scratches", (2, 2, 3, 3))]
    root = make_neu(tmp_path / "NEU-DET", items)
    all_ = load_neu_det(root, "all")
    train, test = load_neu_det(root, "train"), load_neu_det(root, "test")
    assert len(all_) == 7 and len(train) == 5 and len(test) == 2
    assert sorted(Path(r.file).stem for r in test.records) == ["patches_5", "scratches_5"]
    ids = {Path(r.file).stem: r.image_id for r in all_.records}
    assert {Path(r.file).stem: r.image_id for r in test.records} == {k: ids[k] for k in ("patches_5", "scratches_5")}
    assert sorted(ids.values()) == list(range(1, 8))
    r = next(r for r in test.records if "scratches" in r.file)
    # class from <name>, not the file name; VOC 1-based inclusive -> 0-based half-open
    assert r.labels.tolist() == [1, 5]
    np.testing.assert_array_equal(r.boxes, [[4, 5, 40, 40], [1, 1, 3, 3]])
    img, t = test[0]
    assert img.shape == (3, 40, 40) and img.dtype == torch.uint8  # 1-channel JPEG -> 3 channels
    with pytest.raises(SdiddError, match="unknown split"):
        load_neu_det(root, "val")


def test_neu_box_within_tolerance_is_clipped(tmp_path: Path) -> None:
    root = make_neu(tmp_path / "n", {"crazing_1": [("crazing", (0, 1, 41, 40))]})
    np.testing.assert_array_equal(load_neu_det(root).records[0].boxes, [[0, 0, 40, 40]])


@pytest.mark.parametrize(
    "objs, xml_text, pattern",
    [
        (None, "<annotation><size><width>40</width>", "malformed XML"),
        ([("dent", (1, 1, 5, 5))], None, "unknown class name 'dent'"),
        ([("crazing", (1, 1, 45, 5))], None, "outside the 40x40 image"),
        ([("crazing", (10, 1, 5, 5))], None, "non-positive size"),
    ],
)
def test_neu_bad_annotations_raise_naming_file(tmp_path: Path, objs, xml_text, pattern) -> None:
    root = make_neu(tmp_path / "n", {"crazing_1": [("crazing", (1, 1, 5, 5))], "crazing_2": objs or []})
    bad = root / "ANNOTATIONS" / "crazing_2.xml"
    if xml_text is not None:
        bad.write_text(xml_text)
    with pytest.raises(SdiddError, match=pattern) as e:
        load_neu_det(root)
    assert "crazing_2.xml" in str(e.value) and "\n" not in str(e.value)


def test_neu_missing_image_and_unreadable_image(tmp_path: Path) -> None:
    root = make_neu(tmp_path / "n", {"crazing_1": [("crazing", (1, 1, 5, 5))], "crazing_2": []})
    (root / "IMAGES" / "crazing_2.jpg").write_bytes(b"not a jpeg at all")
    ds = load_neu_det(root)
    ds[0]
    with pytest.raises(SdiddError, match=r"crazing_2\.jpg: cannot read image"):
        ds[1]
    full = (root / "IMAGES" / "crazing_1.jpg").read_bytes()
    (root / "IMAGES" / "crazing_1.jpg").write_bytes(full[: len(full) // 2])  # truncated
    with pytest.raises(SdiddError, match=r"crazing_1\.jpg: cannot read image"):
        ds[0]
    (root / "IMAGES" / "crazing_1.jpg").unlink()
    with pytest.raises(SdiddError, match=r"crazing_1.*missing"):
        load_neu_det(root)


# ----------------------------------------------------------------------------- DeepPCB loader


def test_deeppcb_loader(tmp_path: Path) -> None:
    root = make_pcb(
        tmp_path / "DeepPCB",
        {"00001000": "1 2 30 40 1\n10 10 20 20 6\n", "00001001": "5,5,9,9,3\n", "00001002": "\n"},
        test_ids=("00001001",),
    )
    tv, te = load_deeppcb(root, "trainval"), load_deeppcb(root, "test")
    assert tv.classes == ["open", "short", "mousebite", "spur", "copper", "pin-hole"]
    assert len(tv) == 2 and len(te) == 1 and len(load_deeppcb(root, "all")) == 3
    r = tv.records[0]
    assert r.file.endswith("00001000_test.jpg") and (r.width, r.height) == (64, 64)
    np.testing.assert_array_equal(r.boxes, [[1, 2, 30, 40], [10, 10, 20, 20]])
    assert r.labels.tolist() == [0, 5] and tv.records[1].boxes.shape == (0, 4)
    assert te.records[0].labels.tolist() == [2] and te.records[0].image_id == 2  # ids over both splits
    img, _ = te[0]
    assert img.shape == (3, 64, 64)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("1 2 30 40 1\n1 2 30 x 1\n", r"00001000\.txt:2: expected 'x1 y1 x2 y2 type'"),
        ("1 2 30 40\n", r"00001000\.txt:1: expected"),
        ("1 2 30 40 9\n", r"00001000\.txt:1: unknown defect type 9"),
        ("1 2 70 40 2\n", r"00001000\.txt:1: box .* outside the 64x64 image"),
    ],
)
def test_deeppcb_malformed_lines(tmp_path: Path, text: str, pattern: str) -> None:
    root = make_pcb(tmp_path / "p", {"00001000": text})
    with pytest.raises(SdiddError, match=pattern):
        load_deeppcb(root, "trainval")


def test_deeppcb_missing_listed_image(tmp_path: Path) -> None:
    root = make_pcb(tmp_path / "p", {"00001000": "1 2 30 40 1\n", "00001001": "1 2 30 40 1\n"})
    (root / "PCBData/group00001/00001/00001001_test.jpg").unlink()
    with pytest.raises(SdiddError, match=r"trainval\.txt:2: listed image .*00001001_test\.jpg not found"):
        load_deeppcb(root, "trainval")


# ----------------------------------------------------------------------------- COCO json


def test_coco_json_loader(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name in ("b.png", "a.png"):
        Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "imgs" / name)
    coco = {
        "images": [{"id": 10, "file_name": "b.png", "width": 50, "height": 30},
                   {"id": 11, "file_name": "a.png", "width": 50, "height": 30}],
        "categories": [{"id": 7, "name": "late"}, {"id": 3, "name": "early"}],
        "annotations": [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 6, 10, 4], "iscrowd": 0}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    ds = load_coco_json(tmp_path / "imgs", ann)
    assert ds.classes == ["early", "late"]
    assert [Path(r.file).name for r in ds.records] == ["a.png", "b.png"]
    assert [r.image_id for r in ds.records] == [11, 10]  # the json's own ids
    assert ds.category_ids == {"early": 3, "late": 7}
    assert len(ds.records[0].labels) == 0  # image without annotations is kept
    np.testing.assert_array_equal(ds.records[1].boxes, [[5, 6, 15, 10]])
    assert ds.records[1].labels.tolist() == [1]
    built = build_dataset("coco", "test", root=tmp_path, images_dir="imgs", ann_file="ann.json")
    assert len(built) == 2
    ann.write_text("{not json")
    with pytest.raises(SdiddError, match=r"ann\.json: malformed json"):
        load_coco_json(tmp_path / "imgs", ann)


# ----------------------------------------------------------------------------- build / resolve


def test_build_dataset_and_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_neu(tmp_path / "NEU-DET", {"crazing_1": [("crazing", (1, 1, 5, 5))], "crazing_5": []})
    monkeypatch.setenv("SDIDD_DATA", str(tmp_path))
    assert resolve_data_root("NEU-DET") == (tmp_path / "NEU-DET").absolute()
    assert resolve_data_root("neu-det", tmp_path / "NEU-DET") == (tmp_path / "NEU-DET").absolute()
    ds = build_dataset("neu-det", "train", transform=EvalTransform(80, 200))
    assert len(ds) == 1 and ds[0][0].shape == (3, 80, 80)
    assert len(build_dataset("neu-det", "test")) == 1
    with pytest.raises(SdiddError, match=r"DeepPCB not found at .*DeepPCB: expected"):
        build_dataset("deeppcb", "test")
    monkeypatch.delenv("SDIDD_DATA")
    missing = tmp_path / "nowhere"
    with pytest.raises(SdiddError, match=r"NEU-DET not found at .*nowhere/NEU-DET: expected .*IMAGES/\*\.jpg .*SDIDD_DATA"):
        resolve_data_root("neu-det", missing)
    with pytest.raises(SdiddError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", "train")
    with pytest.raises(SdiddError, match="does not take option"):
        build_dataset("neu-det", "train", root=tmp_path, num_images=3)
    syn = build_dataset("synthetic", "train", num_images=2, image_size=64)
    assert len(syn) == 2 and syn[0][0].shape == (3, 64, 64)
