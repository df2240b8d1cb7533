"""Figures: per-class AP50 bars, training loss curves, prediction grids, and box drawing for `predict`."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from .evaluate import to_numpy  # noqa: E402

__all__ = ["plot_per_class_ap", "plot_training_curves", "plot_predictions_grid", "plot_model_predictions", "draw_detections",
           "class_color"]

# Distinct, colour-blind-friendly-ish colours (tab10 without grey) in 0-255 RGB.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 215, 0)]


def class_color(label: int) -> tuple[int, int, int]:
    """RGB colour of a class index (shared by every drawing so a class keeps its colour)."""
    return _PALETTE[int(label) % len(_PALETTE)]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


# ---------------------------------------------------------------------------------------- AP bars

def plot_per_class_ap(methods: Mapping[str, Mapping[str, float]], old: Sequence[str], new: Sequence[str],
                      path: str | Path, title: str = "", errors: Optional[Mapping[str, Mapping[str, float]]] = None) -> Path:
    """Grouped AP50 bars: x = classes (old, then new), one bar per method; missing values are left out.

    `errors` (method -> class -> std over seeds) draws error bars.
    """
    classes = list(old) + list(new)
    names = list(methods)
    n_m = max(len(names), 1)
    width = 0.8 / n_m
    fig_w = max(6.0, 0.9 + len(classes) * (0.35 + 0.28 * n_m))
    fig, ax = plt.subplots(figsize=(fig_w, 4.6))
    x = np.arange(len(classes))
    cmap = plt.get_cmap("tab10")
    small = n_m * len(classes) > 24  # many bars: vertical value labels so they do not overlap
    for j, m in enumerate(names):
        vals = np.array([_num(methods[m].get(c)) for c in classes])
        ok = ~np.isnan(vals)
        xs = x[ok] - 0.4 + width * (j + 0.5)
        err = np.array([_num((errors or {}).get(m, {}).get(c)) for c in classes])[ok] if errors else None
        bars = ax.bar(xs, vals[ok], width * 0.92, label=m, color=cmap(j % 10), edgecolor="white", linewidth=0.5,
                      yerr=None if err is None else np.nan_to_num(err), capsize=2 if errors else 0, error_kw={"linewidth": 0.8})
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals[ok]], fontsize=7 if small else 8,
                     rotation=90 if small else 0, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=20 if max((len(c) for c in classes), default=0) > 9 else 0, ha="right"
                       if max((len(c) for c in classes), default=0) > 9 else "center")
    ax.set_ylim(0, 112)  # room for value labels and the old/new captions above 100
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("AP50 (%)")
    ax.set_xlabel("class")
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if old and new:  # separate and caption the two class groups
        sep = len(old) - 0.5
        ax.axvline(sep, color="black", linestyle="--", linewidth=1)
        ax.text((len(old) - 1) / 2, 107, "old", ha="center", va="center", fontsize=11, weight="bold")
        ax.text(len(old) + (len(new) - 1) / 2, 107, "new", ha="center", va="center", fontsize=11, weight="bold")
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, title="method")
    ax.set_title(title or "AP50 per class")
    return _save(fig, path)


# ---------------------------------------------------------------------------------- training curves

def _read_log(csv_path: str | Path) -> dict[str, np.ndarray]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path}: training log has no rows")
    cols = list(rows[0].keys())
    return {c: np.array([_num(r.get(c)) for r in rows]) for c in cols if c is not None}


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Centered moving average that ignores NaN (masked log values)."""
    ok = ~np.isnan(y)
    kernel = np.ones(k)
    num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def plot_training_curves(csv_path: str | Path, path: str | Path) -> Path:
    """Plot every loss column (total `loss` and `loss_*`) against iteration, log y, with the lr below."""
    log = _read_log(csv_path)
    if "iter" not in log:
        raise ValueError(f"{csv_path}: training log has no 'iter' column")
    it = log["iter"]
    parts = [c for c in log if c == "loss" or c.startswith("loss_")]
    if not parts:
        raise ValueError(f"{csv_path}: training log has no loss columns")
    has_lr = "lr" in log and not np.all(np.isnan(log["lr"]))
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(9, 6.2 if has_lr else 4.6), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]} if has_lr else None, squeeze=False)
    ax = axes[0, 0]
    cmap = plt.get_cmap("tab10")
    k = max(1, len(it) // 40)  # smooth over ~2.5% of the run when it has many points
    positive = False
    for j, c in enumerate(parts):
        y = log[c].copy()
        y[~(y > 0)] = np.nan  # log axis: zero/negative points (e.g. an empty distillation selection) are gaps
        positive |= bool(np.any(y > 0))
        color = "black" if c == "loss" else cmap(j % 10)
        lw = 2.0 if c == "loss" else 1.4
        if k > 1:
            ax.plot(it, y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(it, _smooth(y, k), color=color, linewidth=lw, label=c)
        else:
            ax.plot(it, y, color=color, linewidth=lw, marker="o" if len(it) < 30 else None, markersize=3, label=c)
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("loss (log scale)" if positive else "loss")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, fontsize=9)
    ax.set_title(f"training losses: {Path(csv_path).parent.name}/{Path(csv_path).name}"
                 + (f" (lines smoothed over {k} log points)" if k > 1 else ""))
    if "epoch" in log and len(it) > 1:  # faint epoch boundaries help reading schedules
        ep = log["epoch"]
        for i in np.nonzero(np.diff(ep) > 0)[0]:
            for a in axes[:, 0]:
                a.axvline((it[i] + it[i + 1]) / 2, color="grey", alpha=0.25, linewidth=0.8)
    if has_lr:
        ax2 = axes[1, 0]
        ax2.plot(it, log["lr"], color="tab:purple", linewidth=1.4)
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax2.grid(True, alpha=0.25)
    axes[-1, 0].set_xlabel("iteration")
    return _save(fig, path)


def plot_results(csv_path: str | Path, path: str | Path) -> Path:
    """mAP50 and mAP of each evaluation during training (a run's results.csv) against the epoch."""
    log = _read_log(csv_path)
    if "epoch" not in log or "map50" not in log:
        raise ValueError(f"{csv_path}: no 'epoch' and 'map50' columns")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(log["epoch"], log["map50"], marker="o", label="mAP50")
    if "map" in log:
        ax.plot(log["epoch"], log["map"], marker="o", label="mAP (.5:.95)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(f"evaluation during training: {Path(csv_path).parent.name}/{Path(csv_path).name}")
    return _save(fig, path)


# ------------------------------------------------------------------------------------- detections

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_detections(image: np.ndarray, boxes: Any, scores: Any, labels: Any, class_names: Sequence[str],
                    score_thr: float = 0.3) -> np.ndarray:
    """Copy of `image` (HxWx3 uint8) with boxes >= score_thr drawn in class colours and 'name score' captions."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    pil = Image.fromarray(np.ascontiguousarray(img.astype(np.uint8)[:, :, :3]))
    boxes, scores, labels = to_numpy(boxes, np.float32, 4), to_numpy(scores, np.float32), to_numpy(labels, np.int64)
    h, w = img.shape[:2]
    lw = max(1, round(min(h, w) / 160))
    font = _font(max(10, round(min(h, w) / 28)))
    draw = ImageDraw.Draw(pil)
    keep = np.nonzero(scores >= score_thr)[0]
    for i in keep[np.argsort(scores[keep], kind="stable")]:  # best last, so it is drawn on top
        x1, y1, x2, y2 = boxes[i].tolist()
        lab = int(labels[i])
        color = class_color(lab)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=lw)
        name = class_names[lab] if 0 <= lab < len(class_names) else str(lab)
        text = f"{name} {scores[i]:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l, b - t
        ty = y1 - th - 3 if y1 - th - 3 >= 0 else y1 + lw  # above the box, or inside when at the top edge
        tx = min(max(x1, 0), max(w - tw - 2, 0))
        draw.rectangle([tx, ty, tx + tw + 2, ty + th + 2], fill=color)
        draw.text((tx + 1 - l, ty + 1 - t), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def plot_predictions_grid(images: Sequence[np.ndarray], detections: Sequence[Mapping[str, Any]],
                          class_names: Sequence[str], path: str | Path, gt: Optional[Sequence[Mapping[str, Any]]] = None,
                          score_thr: float = 0.3, cols: int = 4) -> Path:
    """Grid of images with detections (class colours, 'name score') and optional GT boxes (dashed white)."""
    n = len(images)
    if n == 0:
        raise ValueError("plot_predictions_grid needs at least one image")
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    # constrained layout keeps each title clear of the image above and leaves room for the legend.
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows + 0.6), squeeze=False, layout="constrained")
    used: set[int] = set()
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = np.asarray(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        if gt is not None and i < len(gt):
            for x1, y1, x2, y2 in to_numpy(gt[i].get("boxes"), np.float32, 4).tolist():
                ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white",
                                               linestyle=(0, (4, 3)), linewidth=1.6))
        det = detections[i] if i < len(detections) else {}
        boxes, scores = to_numpy(det.get("boxes"), np.float32, 4), to_numpy(det.get("scores"), np.float32)
        labels = to_numpy(det.get("labels"), np.int64)
        keep = np.nonzero(scores >= score_thr)[0]
        for j in keep[np.argsort(scores[keep], kind="stable")]:
            x1, y1, x2, y2 = boxes[j].tolist()
            lab = int(labels[j])
            used.add(lab)
            color = np.array(class_color(lab)) / 255
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.8))
            name = class_names[lab] if 0 <= lab < len(class_names) else str(lab)
            ax.text(x1, y1, f"{name} {scores[j]:.2f}", fontsize=7, color="white", va="bottom", ha="left",
                    bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0, "alpha": 0.85}, clip_on=True)
        ax.set_title(f"image {i + 1}: {len(keep)} det" + ("" if len(keep) == 1 else "s"), fontsize=9)
    handles = [patches.Patch(color=np.array(class_color(c)) / 255, label=class_names[c] if c < len(class_names) else str(c))
               for c in sorted(used)]
    if gt is not None:
        handles.append(patches.Patch(facecolor="lightgrey", edgecolor="black", linestyle="--", label="ground truth (dashed)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), frameon=False, fontsize=9)
    fig.suptitle(f"predictions (score >= {score_thr:g})", fontsize=11)
    return _save(fig, path)


def plot_model_predictions(model: Any, dataset: Any, class_names: Sequence[str], path: str | Path, num_images: int = 8,
                           score_thr: float = 0.3) -> Path:
    """Predict `num_images` test images spread over `dataset` (its eval transform set) and save their grid with GT."""
    import torch

    from .data.transforms import collate
    if len(dataset) == 0:
        raise ValueError("plot_model_predictions needs a non-empty dataset")
    step = max(len(dataset) // num_images, 1)  # spread over the split: NEU-DET's test images are sorted by class
    batch = collate([dataset[i] for i in range(0, len(dataset), step)][:num_images])
    images = [im[:, :h, :w].permute(1, 2, 0).clamp(0, 255).byte().numpy()
              for im, (h, w) in zip(batch["images"], batch["image_sizes"])]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        dets = model.predict(batch["images"].to(device), batch["image_sizes"])
    dets = [{k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()} for d in dets]
    return plot_predictions_grid(images, dets, class_names, path, gt=batch["targets"], score_thr=score_thr)
