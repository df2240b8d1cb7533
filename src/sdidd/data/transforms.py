"""Resize / flip transforms that keep boxes aligned, and the batch `collate`.

Boxes travel as ``tv_tensors.BoundingBoxes`` (XYXY) through torchvision's v2 functional ops, so
they follow the image exactly. The target gains ``scale`` (resized / original size, one float for
both axes), ``scale_xy`` (the exact per-axis factors after rounding to whole pixels) and
``orig_size`` ((h, w) before resizing).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

__all__ = ["TrainTransform", "EvalTransform", "collate", "pad_targets", "resize_and_flip", "target_size", "PAD_DIVISOR"]

PAD_DIVISOR = 32  # the coarsest backbone stride the padded batch must divide


def target_size(h: int, w: int, short_size: int, max_size: int) -> tuple[int, int, float]:
    """(new_h, new_w, scale) with the short side = short_size unless the long side would pass max_size."""
    scale = short_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale))), float(scale)


def resize_and_flip(
    image: torch.Tensor, target: dict, short_size: int, max_size: int, flip: bool
) -> tuple[torch.Tensor, dict]:
    """Resize (keeping aspect ratio) then optionally mirror horizontally; boxes follow."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    nh, nw, scale = target_size(h, w, short_size, max_size)
    boxes = tv_tensors.BoundingBoxes(
        torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
    )
    if (nh, nw) != (h, w):
        image = F.resize(image, [nh, nw], antialias=True)
        boxes = F.resize(boxes, [nh, nw])
    if flip:
        image = F.horizontal_flip(image)
        boxes = F.horizontal_flip(boxes)
    boxes = F.clamp_bounding_boxes(boxes)
    b = boxes.as_subclass(torch.Tensor).float()
    # Boxes that shrink below a pixel carry no usable signal and upset IoU-based assignment.
    keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
    out = dict(target)
    out["boxes"] = b[keep]
    out["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)[keep]
    out["scale"] = scale
    out["scale_xy"] = (nw / w, nh / h)
    out["orig_size"] = (h, w)
    out["flipped"] = bool(flip)
    return image, out


class TrainTransform:
    """Multi-scale resize (short side drawn from `short_sizes`) plus random horizontal flip."""

    def __init__(self, short_sizes: Sequence[int], max_size: int, flip_prob: float = 0.5) -> None:
        if isinstance(short_sizes, int):
            short_sizes = [short_sizes]
        if not short_sizes:
            raise ValueError("TrainTransform needs at least one short size")
        self.short_sizes = [int(s) for s in short_sizes]
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        """Apply a random scale and flip to one (image, target) pair."""
        # torch's RNG, so torch.manual_seed and DataLoader worker seeding make runs reproducible.
        short = self.short_sizes[int(torch.randint(len(self.short_sizes), ()).item())]
        flip = bool(torch.rand(()).item() < self.flip_prob)
        return resize_and_flip(image, target, short, self.max_size, flip)

    def __repr__(self) -> str:
        return f"TrainTransform(short_sizes={self.short_sizes}, max_size={self.max_size}, flip_prob={self.flip_prob})"


class EvalTransform:
    """Deterministic resize to one short size (long side capped), no flip."""

    def __init__(self, short_size: int, max_size: int) -> None:
        self.short_size = int(short_size)
        self.max_size = int(max_size)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        """Resize one (image, target) pair."""
        return resize_and_flip(image, target, self.short_size, self.max_size, False)

    def __repr__(self) -> str:
        return f"EvalTransform(short_size={self.short_size}, max_size={self.max_size})"


def pad_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image GT lists -> padded ([B, G, 4] float, [B, G] long with -1 on padded rows), G = the largest count."""
    g = max((len(lab) for lab in labels), default=0)
    out_b = torch.zeros((len(boxes), g, 4), dtype=torch.float32, device=boxes[0].device if len(boxes) else None)
    out_l = torch.full((len(labels), g), -1, dtype=torch.int64, device=out_b.device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        out_b[i, : len(lab)] = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
        out_l[i, : len(lab)] = torch.as_tensor(lab, dtype=torch.int64).reshape(-1)
    return out_b, out_l


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> dict:
    """Stack images zero-padded (bottom/right) to a multiple of 32; GT boxes/labels padded to the batch's max count.

    `boxes` [B, G, 4] and `labels` [B, G] (-1 on padded rows) go to the device in one copy each, so the loss
    needs no per-image host work; `sizes` [B, 2] (h, w) marks each image's unpadded region.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    images = [im for im, _ in batch]
    targets = [t for _, t in batch]
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    hp = int(math.ceil(max(h for h, _ in sizes) / PAD_DIVISOR)) * PAD_DIVISOR
    wp = int(math.ceil(max(w for _, w in sizes) / PAD_DIVISOR)) * PAD_DIVISOR
    out = images[0].new_zeros((len(images), images[0].shape[0], hp, wp))
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        out[i, :, :h, :w] = im
    boxes, labels = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets])
    return {
        "images": out,
        "boxes": boxes,
        "labels": labels,
        "sizes": torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
        "targets": targets,
        "image_sizes": sizes,
        # Per-axis (sx, sy): whole-pixel rounding makes the two axes differ slightly from the nominal scale.
        "scales": [tuple(t.get("scale_xy", (1.0, 1.0))) for t in targets],
        "image_ids": [int(t["image_id"]) for t in targets],
        "flips": [bool(t.get("flipped", False)) for t in targets],
    }
