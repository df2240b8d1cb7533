"""Each figure writes a readable PNG of a sensible size; draw_detections draws where the box is."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdidd.plots import draw_detections, plot_per_class_ap, plot_predictions_grid, plot_training_curves

NAMES = ["crazing", "inclusion", "patches", "pitted_surface"]


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def test_plot_per_class_ap(tmp_path: Path) -> None:
    methods = {"teacher": {"crazing": 80.0, "inclusion": 70.0},  # teacher knows only the old classes
               "sdidd": {c: 60.0 + i for i, c in enumerate(NAMES)},
               "erd": {"crazing": 50.0, "inclusion": None, "patches": float("nan"), "pitted_surface": 40.0}}
    w, h = _png_size(plot_per_class_ap(methods, NAMES[:2], NAMES[2:], tmp_path / "ap.png", title="t"))
    assert 400 < w < 3000 and 250 < h < 1200
    # No old classes (a plain evaluation): still a figure.
    assert _png_size(plot_per_class_ap({"m": {c: 10.0 for c in NAMES}}, [], NAMES, tmp_path / "sub" / "ap2.png"))[0] > 300


def test_plot_training_curves(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    with open(log, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "iter", "lr", "loss", "loss_qfl", "loss_distill", "num_pos", "img_s"])
        w.writeheader()
        for it in range(1, 200, 4):
            w.writerow({"epoch": 1 + it // 100, "iter": it, "lr": 0.01 * min(1.0, it / 50), "loss": 2.0 / it ** 0.3,
                        "loss_qfl": 1.0 / it ** 0.3, "loss_distill": 0.0 if it % 3 == 0 else 0.01, "num_pos": 9, "img_s": 3.0})
    w_, h_ = _png_size(plot_training_curves(log, tmp_path / "curves.png"))
    assert 500 < w_ < 2500 and 300 < h_ < 1500
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,iter,lr,loss\n")
    with pytest.raises(ValueError, match="no rows"):
        plot_training_curves(empty, tmp_path / "x.png")


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.full((96, 128, 3), 100, np.uint8) + rng.integers(0, 20, (96, 128, 3), dtype=np.uint8)


def test_plot_predictions_grid(tmp_path: Path) -> None:
    imgs = [_image() for _ in range(5)]
    dets = [{"boxes": np.array([[10, 20, 60, 70], [70, 5, 120, 40]], np.float32), "scores": np.array([0.9, 0.2]),
             "labels": np.array([i % 4, 1])} for i in range(5)]
    dets[4] = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    gt = [{"boxes": np.array([[12, 18, 58, 72]], np.float32), "labels": np.array([0])} for _ in range(5)]
    w, h = _png_size(plot_predictions_grid(imgs, dets, NAMES, tmp_path / "grid.png", gt=gt, cols=3))
    assert 600 < w < 2500 and 400 < h < 2000 and w > h  # 3 columns x 2 rows


def test_draw_detections_draws_inside_box_border() -> None:
    img = _image()
    out = draw_detections(img, np.array([[30, 40, 90, 80], [0, 0, 10, 10]]), np.array([0.8, 0.1]), np.array([2, 0]),
                          NAMES, score_thr=0.3)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.shares_memory(out, img) and (img >= 100).all()  # input untouched
    assert (out[60, 30] != img[60, 30]).any() and (out[80, 60] != img[80, 60]).any()  # left / bottom edges
    assert (out[60, 60] == img[60, 60]).all()  # box interior stays clear
    assert (out[5, 5] == img[5, 5]).all()  # below score_thr: not drawn
    gray = draw_detections(img[:, :, 0], torch.tensor([[30.0, 40, 90, 80]]), torch.tensor([0.8]), torch.tensor([7]), NAMES)
    assert gray.shape == img.shape  # grayscale in, RGB out; unknown label index drawn by number
