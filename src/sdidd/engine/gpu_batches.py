"""Resize and flip whole training batches on the training device (`data.device_transforms`).

The loader then only stacks the decoded uint8 images as they are (NEU-DET: all 200 x 200) and pads the GT
lists; :meth:`DeviceBatches.to_device` copies the batch to the device once and does the rest there: one short
side per batch drawn from `data.train_sizes` (per-batch multi-scale, as YOLO-style trainers do, where the CPU
path draws one per image), one `interpolate` call for the whole batch when its images share a size, a
horizontal flip per image chosen by a mask, boxes scaled / mirrored / clamped as tensors, and boxes below a
pixel turned into padding (label -1), as `data/transforms.py` drops them. The RNG draws are on the CPU (no
host sync); on a CPU device the same code runs, which is how it is tested.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.transforms import PAD_DIVISOR, pad_targets, target_size

__all__ = ["DeviceBatches"]


class DeviceBatches:
    """A loader `collate_fn` for raw (untransformed) images plus the device-side resize / flip of its batches."""

    def __init__(self, short_sizes: Sequence[int], max_size: int, flip_prob: float = 0.5) -> None:
        self.short_sizes = [int(s) for s in short_sizes]
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)

    def __call__(self, batch: Sequence[tuple[Tensor, dict]]) -> dict:
        """Stack raw uint8 images (zero-padded to the batch's largest) and pad the GT lists; nothing is resized."""
        if len(batch) == 0:
            raise ValueError("DeviceBatches got an empty batch")
        images = [im for im, _ in batch]
        targets = [t for _, t in batch]
        raw = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        h, w = max(s[0] for s in raw), max(s[1] for s in raw)
        if all(s == (h, w) for s in raw):
            out = torch.stack(images)
        else:
            out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
            for i, (im, (ih, iw)) in enumerate(zip(images, raw)):
                out[i, :, :ih, :iw] = im
        boxes, labels = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets])
        return {"images": out, "boxes": boxes, "labels": labels, "raw_sizes": raw, "image_ids": [int(t["image_id"]) for t in targets]}

    def to_device(self, batch: dict, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images float [B,3,H,W] padded to 32, boxes [B,G,4], labels [B,G], sizes [B,2]) resized and flipped on `device`."""
        raw: list[tuple[int, int]] = batch["raw_sizes"]
        n = len(raw)
        short = self.short_sizes[int(torch.randint(len(self.short_sizes), ()))]  # CPU RNG: no device sync
        flip = torch.rand(n) < self.flip_prob
        batch["flips"] = flip.tolist()  # which images were mirrored: the teacher cache's keys (engine/teacher_cache.py)
        new = [target_size(h, w, short, self.max_size)[:2] for h, w in raw]
        hp = int(math.ceil(max(h for h, _ in new) / PAD_DIVISOR)) * PAD_DIVISOR
        wp = int(math.ceil(max(w for _, w in new) / PAD_DIVISOR)) * PAD_DIVISOR
        src = batch["images"].to(device, non_blocking=True).float()
        out = src.new_zeros((n, src.shape[1], hp, wp))
        flip_dev = flip.to(device, non_blocking=True)
        if len(set(raw)) == 1:  # the usual case (NEU-DET): one resize for the whole batch
            (h, w), (nh, nw) = raw[0], new[0]
            img = _resize(src[:, :, :h, :w], nh, nw)
            out[:, :, :nh, :nw] = torch.where(flip_dev[:, None, None, None], img.flip(-1), img)
        else:  # images of several sizes: one resize each (a loop over images, not over boxes)
            for i, ((h, w), (nh, nw)) in enumerate(zip(raw, new)):
                img = _resize(src[i:i + 1, :, :h, :w], nh, nw)
                out[i:i + 1, :, :nh, :nw] = img.flip(-1) if bool(flip[i]) else img
        # Per-axis factors of the whole-pixel sizes, as data/transforms.py uses for boxes.
        scale = torch.tensor([[nw / w, nh / h, nw / w, nh / h] for (h, w), (nh, nw) in zip(raw, new)], dtype=torch.float32)
        limit = torch.tensor([[nw, nh, nw, nh] for nh, nw in new], dtype=torch.float32)
        sizes = torch.tensor(new, dtype=torch.int64).reshape(-1, 2)
        scale, limit, sizes = (x.to(device, non_blocking=True) for x in (scale, limit, sizes))
        boxes = batch["boxes"].to(device, non_blocking=True) * scale[:, None, :]
        mirrored = torch.stack([limit[:, None, 0] - boxes[..., 2], boxes[..., 1], limit[:, None, 0] - boxes[..., 0], boxes[..., 3]], -1)
        boxes = torch.where(flip_dev[:, None, None], mirrored, boxes)
        boxes = torch.minimum(boxes.clamp(min=0), limit[:, None, :])
        labels = batch["labels"].to(device, non_blocking=True)
        tiny = ((boxes[..., 2] - boxes[..., 0]) < 1) | ((boxes[..., 3] - boxes[..., 1]) < 1)
        labels = torch.where(tiny, torch.full_like(labels, -1), labels)
        return out, boxes, labels, sizes

    def __repr__(self) -> str:
        return f"DeviceBatches(short_sizes={self.short_sizes}, max_size={self.max_size}, flip_prob={self.flip_prob})"


def _resize(images: Tensor, h: int, w: int) -> Tensor:
    """Bilinear, antialiased resize of float 0-255 images, rounded as the loader's uint8 resize is."""
    if tuple(images.shape[-2:]) == (h, w):
        return images
    return F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True).round_().clamp_(0, 255)
