"""Built-in procedural defect dataset: brushed-metal backgrounds with 4 defect classes.

Nothing is downloaded; this is the default data of the demo and the tests. Image ``i`` of a split
depends only on ``(seed, split, i)`` (train and test draw from disjoint seed streams), so a smaller
``num_images`` gives a prefix of the larger set. Each image holds 1-4 defects of random classes, so
old- and new-class defects co-occur, which is what makes forgetting matter in an incremental step.

All pixels are rendered at construction (160 px images: ~25 KB each) and kept in memory as
grayscale.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from sdidd.data.records import DetectionDataset, Record, Transform
from sdidd.errors import SdiddError

__all__ = ["SYNTHETIC_CLASSES", "SyntheticDataset", "load_synthetic", "render_image"]

SYNTHETIC_CLASSES = ["scratch", "spot", "patch", "crack"]
DEFAULT_NUM_IMAGES = {"train": 240, "test": 80}
_GENERATOR_VERSION = 1  # part of every image's seed: bump when rendering changes
_SPLIT_CODE = {"train": 0, "test": 1}  # part of the seed: train and test streams never overlap
_MASK_THRESHOLD = 0.25  # a pixel belongs to a defect's box when its mask reaches this
_MIN_SIDE = 4
_MAX_IOU = 0.3  # defects may overlap a little, not hide each other
SCRATCH, SPOT, PATCH, CRACK = range(4)


def _smooth_1d(x: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Moving average of width k along `axis` (wrap-around), used for streaks."""
    c = np.cumsum(np.concatenate([x, np.take(x, range(k), axis=axis)], axis=axis), axis=axis)
    n = x.shape[axis]
    hi = np.take(c, range(k, n + k), axis=axis)
    lo = np.take(c, range(0, n), axis=axis)
    return (hi - lo) / k


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed-steel texture: streaks along one axis, smooth illumination; float32 [S,S]."""
    s = size
    base = rng.uniform(105.0, 155.0)
    # Streaks: per-row offsets plus fine noise smeared along the brushing direction.
    rows = _smooth_1d(rng.normal(0.0, 7.0, (s, 1)), 2, axis=0)
    fine = _smooth_1d(rng.normal(0.0, 9.0, (s, s)), max(8, s // 8), axis=1)
    tex = rows + fine
    if rng.random() < 0.5:  # vertical brushing half of the time
        tex = tex.T
    # Low-frequency illumination: a coarse random grid, bilinearly upsampled, plus a gradient.
    coarse = rng.normal(0.0, 10.0, (4, 4)).astype(np.float32)
    illum = np.asarray(Image.fromarray(coarse).resize((s, s), Image.BILINEAR))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    g = rng.normal(0.0, 12.0, 2)
    return (base + tex + illum + g[0] * (xx - 0.5) + g[1] * (yy - 0.5)).astype(np.float32)


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("L", (size, size), 0)
    return im, ImageDraw.Draw(im)


def _draw_scratch(rng: np.random.Generator, size: int, k: float) -> tuple[np.ndarray, float]:
    """Thin long bright or dark line at a random angle, slightly bent."""
    length = rng.uniform(0.25, 0.65) * size
    # Keep away from axis-aligned angles so both box sides stay >= a few px.
    ang = rng.uniform(0.15, math.pi / 2 - 0.15) + rng.integers(0, 2) * math.pi / 2
    d = np.array([math.cos(ang), math.sin(ang)])
    c = rng.uniform(0.2, 0.8, 2) * size
    p0, p1 = c - d * length / 2, c + d * length / 2
    pm = c + np.array([-d[1], d[0]]) * rng.normal(0.0, 0.04 * length)
    im, dr = _canvas(size)
    dr.line([tuple(p0), tuple(pm), tuple(p1)], fill=255, width=int(rng.integers(1, 3)))
    im = im.filter(ImageFilter.GaussianBlur(0.5))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return np.asarray(im, np.float32) / 255.0 * 1.6, sign * rng.uniform(45.0, 75.0)


def _draw_spot(rng: np.random.Generator, size: int, k: float) -> tuple[np.ndarray, float]:
    """One to three small dark round blobs close together."""
    c = rng.uniform(0.1, 0.9, 2) * size
    im, dr = _canvas(size)
    for _ in range(int(rng.integers(1, 4))):
        o = c + rng.normal(0.0, 5.0 * k, 2)
        r = rng.uniform(2.5, 5.5) * k
        rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
        dr.ellipse([o[0] - rx, o[1] - ry, o[0] + rx, o[1] + ry], fill=255)
    im = im.filter(ImageFilter.GaussianBlur(0.8 * k))
    return np.asarray(im, np.float32) / 255.0, -rng.uniform(55.0, 90.0)


def _draw_patch(rng: np.random.Generator, size: int, k: float) -> tuple[np.ndarray, float]:
    """Larger irregular low-contrast region with soft edges and a mottled inside."""
    c = rng.uniform(0.15, 0.85, 2) * size
    r = rng.uniform(10.0, 26.0) * k
    n = int(rng.integers(8, 13))
    angs = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = r * rng.uniform(0.55, 1.15, n)
    pts = [(c[0] + q * math.cos(a), c[1] + q * math.sin(a) * rng.uniform(0.6, 1.0)) for a, q in zip(angs, rad)]
    im, dr = _canvas(size)
    dr.polygon(pts, fill=255)
    im = im.filter(ImageFilter.GaussianBlur(2.0 * k))
    mottle = np.asarray(
        Image.fromarray(rng.uniform(0.6, 1.0, (6, 6)).astype(np.float32)).resize((size, size), Image.BILINEAR)
    )
    sign = 1.0 if rng.random() < 0.35 else -1.0
    return np.asarray(im, np.float32) / 255.0 * mottle, sign * rng.uniform(20.0, 34.0)


def _draw_crack(rng: np.random.Generator, size: int, k: float) -> tuple[np.ndarray, float]:
    """Dark zig-zag polyline with one or two branches."""
    p = rng.uniform(0.2, 0.8, 2) * size
    theta = rng.uniform(0, 2 * math.pi)
    im, dr = _canvas(size)
    main = [tuple(p)]
    zig = 1.0
    for _ in range(int(rng.integers(6, 11))):
        zig = -zig  # alternate the turn for the zig-zag look
        a = theta + zig * rng.uniform(0.3, 0.8)
        p = p + rng.uniform(4.0, 8.0) * k * np.array([math.cos(a), math.sin(a)])
        main.append(tuple(p))
    dr.line(main, fill=255, width=2, joint="curve")
    for _ in range(int(rng.integers(1, 3))):
        q = np.array(main[int(rng.integers(1, len(main) - 1))])
        a0 = theta + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
        br = [tuple(q)]
        for _ in range(int(rng.integers(2, 5))):
            a = a0 + rng.normal(0.0, 0.4)
            q = q + rng.uniform(3.0, 7.0) * k * np.array([math.cos(a), math.sin(a)])
            br.append(tuple(q))
        dr.line(br, fill=255, width=1)
    im = im.filter(ImageFilter.GaussianBlur(0.5))
    return np.asarray(im, np.float32) / 255.0 * 1.4, -rng.uniform(55.0, 85.0)


_DRAW = {SCRATCH: _draw_scratch, SPOT: _draw_spot, PATCH: _draw_patch, CRACK: _draw_crack}


def _mask_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight half-open xyxy box of the pixels where the mask is visible; None if empty."""
    on = mask >= _MASK_THRESHOLD
    cols, rows = np.flatnonzero(on.any(0)), np.flatnonzero(on.any(1))
    if len(cols) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[None, :2], b[:, :2])
    rb = np.minimum(a[None, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def render_image(seed: int, split: str, index: int, size: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render image `index` of `split`: (gray uint8 [S,S], boxes float32 [N,4], labels int64 [N])."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index, _GENERATOR_VERSION])
    k = size / 160.0  # geometry is designed at 160 px and scales with the image
    img = _background(rng, size)
    n = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.32, 0.18]))
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(n):
        cls = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
        for _try in range(12):
            mask, contrast = _DRAW[cls](rng, size, k)
            box = _mask_box(mask)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < _MIN_SIDE:
                continue
            if boxes and _iou(box, np.stack(boxes)).max() > _MAX_IOU:
                continue
            img += contrast * np.minimum(mask, 1.0)
            boxes.append(box)
            labels.append(cls)
            break
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)  # sensor noise over defects too
    gray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    arr = np.stack(boxes) if boxes else np.zeros((0, 4), np.float32)
    return gray, arr, np.asarray(labels, dtype=np.int64)


class SyntheticDataset(DetectionDataset):
    """DetectionDataset whose pixels come from memory instead of image files."""

    def __init__(
        self,
        split: str = "train",
        num_images: Optional[int] = None,
        image_size: int = 160,
        seed: int = 0,
        transform: Optional[Transform] = None,
    ) -> None:
        if split not in _SPLIT_CODE:
            raise SdiddError(f"synthetic: unknown split {split!r} (expected train or test)")
        n = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
        if n < 0 or image_size < 32 or seed < 0:
            raise SdiddError(
                f"synthetic: need num_images >= 0, image_size >= 32, seed >= 0 (got {n}, {image_size}, {seed})"
            )
        self.split, self.image_size, self.seed = split, int(image_size), int(seed)
        grays, boxes, labels = self._generate(n)
        # Keyed by image_id so subsets (which drop records) still find their pixels.
        self._gray: dict[int, np.ndarray] = {}
        records = []
        for i in range(n):
            rec = Record(i + 1, f"synthetic://{split}/{i:06d}", self.image_size, self.image_size, boxes[i], labels[i])
            self._gray[rec.image_id] = grays[i]
            records.append(rec)
        super().__init__(SYNTHETIC_CLASSES, records, transform=transform, name=f"synthetic/{split}")

    def _generate(self, n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        out = [render_image(self.seed, self.split, i, self.image_size) for i in range(n)]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

    @property
    def in_memory(self) -> bool:
        """Generated pixels always live in memory."""
        return True

    def load_image(self, i: int) -> torch.Tensor:
        """Record `i`'s pixels as uint8 [3,S,S] (a fresh tensor; the stored gray image is shared)."""
        gray = torch.from_numpy(self._gray[self.records[i].image_id])
        return gray.unsqueeze(0).repeat(3, 1, 1)


def load_synthetic(
    split: str = "train",
    num_images: Optional[int] = None,
    image_size: int = 160,
    seed: int = 0,
) -> DetectionDataset:
    """The procedural defect dataset (train: 240 images, test: 80 by default)."""
    return SyntheticDataset(split, num_images, image_size, seed)
