"""Device choice shared by training, evaluation and prediction."""
from __future__ import annotations

import torch

from .errors import SdiddError


def select_device(name: str, key: str = "train.device") -> torch.device:
    """'auto' picks CUDA when present; an unavailable or malformed device is one SdiddError line naming `key`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SdiddError(f"{key} {name}: CUDA is not available (use cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SdiddError(f"{key} {name}: not a device (auto, cpu, cuda, cuda:N)") from None
