"""Per-image mean + k*std selections restricted to the anchors inside the unpadded image."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def above_mean_std(values: Tensor, k_sigma: float, valid: Optional[Tensor] = None) -> Tensor:
    """[B, A] bool: values > mean + k * std (unbiased) per image, both over the valid anchors only.

    Invalid anchors (padding outside the image) neither enter the statistics nor get selected. With
    fewer than two valid anchors the std is taken as 0 (torch's would be NaN, which selects nothing too).
    """
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    v = valid.to(values.dtype)
    n = v.sum(dim=1, keepdim=True)
    mean = (values * v).sum(dim=1, keepdim=True) / n.clamp(min=1)
    var = ((values - mean).pow(2) * v).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    return (values > mean + k_sigma * var.sqrt()) & valid
