"""Anchor points of the dense detector: one location per feature-map cell on every FPN level."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AnchorGrid:
    """Anchor locations of all levels concatenated (level by level, row-major inside a level)."""

    points: Tensor  # [A, 2] cell centres (x, y) in input pixels
    strides: Tensor  # [A] stride of the level each anchor belongs to
    num_per_level: list[int]
    sizes: list[tuple[int, int]]  # (H_l, W_l) per level

    @property
    def boxes(self) -> Tensor:
        """Square anchors of side 8 * stride, used only by ATSS and the selection rules."""
        half = 4.0 * self.strides[:, None]
        return torch.cat([self.points - half, self.points + half], dim=1)


def make_anchor_grid(sizes: list[tuple[int, int]], strides: list[int], device: torch.device) -> AnchorGrid:
    """Cell centres ((x + 0.5) * s, (y + 0.5) * s) for each level's (H, W)."""
    points, level_strides, counts = [], [], []
    for (h, w), s in zip(sizes, strides):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
        level_strides.append(torch.full((h * w,), float(s), device=device))
        counts.append(h * w)
    return AnchorGrid(torch.cat(points), torch.cat(level_strides), counts, list(sizes))
