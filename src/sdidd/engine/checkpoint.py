"""Checkpoints: atomic writes, weights-only loading, and checks of what a checkpoint holds."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import SdiddError

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename.

    A failure part way (full disk, kill) leaves the previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (it cannot run code) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise SdiddError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise SdiddError(f"{path}: refused, the checkpoint holds pickled objects that could run code ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SdiddError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise SdiddError(f"{path}: not an sdidd checkpoint (no model/format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise SdiddError(f"{path}: checkpoint format {state['format_version']} is newer than this sdidd ({FORMAT_VERSION}); upgrade sdidd")
    for key in ("detector", "classes"):
        if key not in state:
            raise SdiddError(f"{path}: checkpoint lacks '{key}'")
    return state
