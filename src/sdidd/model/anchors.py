"""Anchor points of the dense detector: one location per feature-map cell on every FPN level."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

# ATSS / selection-rule anchors are squares of side octave_scale * stride (GFL's octave_base_scale = 8).
OCTAVE_SCALE = 8.0
_CACHE_SIZE = 32  # distinct (sizes, strides, device) grids kept: multi-scale training uses a handful


def anchor_boxes(points: Tensor, strides: Tensor, octave_scale: float = OCTAVE_SCALE) -> Tensor:
    """Square anchors of side ``octave_scale * stride`` centred on ``points`` ([A, 2], [A]) -> [A, 4]."""
    half = 0.5 * octave_scale * strides.to(points.dtype)[:, None]
    return torch.cat([points - half, points + half], dim=1)


@dataclass(eq=False)
class AnchorGrid:
    """Anchor locations of all levels concatenated (level by level, row-major inside a level).

    Instances are shared through the :func:`make_anchor_grid` cache: treat them as read-only.
    """

    points: Tensor  # [A, 2] cell centres (x, y) in input pixels
    strides: Tensor  # [A] stride of the level each anchor belongs to
    num_per_level: list[int]
    sizes: list[tuple[int, int]]  # (H_l, W_l) per level
    # Square anchors of side 8 * stride, used only by ATSS and the selection rules; computed once.
    boxes: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.boxes = anchor_boxes(self.points, self.strides)

    def valid_mask(self, image_sizes: Tensor) -> Tensor:
        """[B, A] bool: anchor point (x, y) inside the unpadded image, x < w and y < h, for image_sizes [B, 2] (h, w)."""
        sizes = image_sizes.to(self.points.device)
        x, y = self.points[None, :, 0], self.points[None, :, 1]
        return (x < sizes[:, 1:2]) & (y < sizes[:, 0:1])


_GRIDS: "OrderedDict[tuple, AnchorGrid]" = OrderedDict()


def make_anchor_grid(sizes: list[tuple[int, int]], strides: list[int], device: torch.device) -> AnchorGrid:
    """Cell centres ((x + 0.5) * s, (y + 0.5) * s) for each level's (H, W); cached per (sizes, strides, device)."""
    sizes = [(int(h), int(w)) for h, w in sizes]
    key = (tuple(sizes), tuple(int(s) for s in strides), torch.device(device))
    grid = _GRIDS.get(key)
    if grid is not None:
        _GRIDS.move_to_end(key)
        return grid
    # Ordinary tensors even when first called under inference_mode / no_grad: the cached grid is later
    # used by training, where inference tensors could not be saved for backward.
    with torch.inference_mode(False), torch.no_grad():
        points, level_strides, counts = [], [], []
        for (h, w), s in zip(sizes, strides):
            ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
            xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
            level_strides.append(torch.full((h * w,), float(s), device=device))
            counts.append(h * w)
        grid = AnchorGrid(torch.cat(points), torch.cat(level_strides), counts, list(sizes))
    _GRIDS[key] = grid
    if len(_GRIDS) > _CACHE_SIZE:
        _GRIDS.popitem(last=False)  # least recently used
    return grid
