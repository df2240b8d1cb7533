"""A frozen teacher's outputs computed once per (image, flip) and read back in later epochs (`train.teacher_cache_gb`).

A teacher in an incremental step is frozen (eval-mode BatchNorm, no gradient), so its outputs for an image
depend only on the pixels it is given. When every training image reaches the network at the same size (one
`data.train_sizes` entry and one raw image size, as on NEU-DET and DeepPCB), those pixels are fixed by the
image and its horizontal flip, and the padded canvas is the same in every batch: an 8-epoch step then asks
the teacher about each (image, flip) about four times, a 40-epoch small-data step about twenty. The cache
runs the teacher only on the images of a batch it has not seen, and assembles the batch's outputs (logits,
box distributions and the FPN features IDFD reads) from what it holds. Entries are kept in the dtype the
teacher produced them in (bf16 under autocast), up to a memory budget; past it the rest are computed each time.
"""
from __future__ import annotations

import logging
from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor

from ..data import DetectionDataset
from ..model.detector import GFL, DenseOutput

log = logging.getLogger(__name__)

Entry = tuple[Tensor, Tensor, list[Tensor]]  # one image's (cls [A, C], reg [A, 4, R+1], feats [C, h, w] per level)


def cache_blocker(dataset: DetectionDataset, train_sizes: Sequence[int]) -> Optional[str]:
    """Why a teacher's outputs cannot be reused across epochs on this training set (None when they can)."""
    if len(train_sizes) != 1:
        return f"data.train_sizes has {len(train_sizes)} sizes (multi-scale training changes the teacher's input each epoch)"
    raw = {(r.height, r.width) for r in dataset.records}
    if len(raw) != 1:
        return f"the training images have {len(raw)} different sizes (a batch's padded canvas depends on its images)"
    return None


class TeacherCache:
    """Calls a frozen `model` on the images of a batch it has not seen; the others come from memory."""

    def __init__(self, model: GFL, max_bytes: int, name: str = "teacher") -> None:
        self.model = model
        self.max_bytes = int(max_bytes)
        self.name = name
        self.entries: dict[Hashable, Entry] = {}
        self.bytes = 0
        self.full = False
        self.hits = 0
        self.misses = 0
        self._grid = None  # the anchor grid of the (one) canvas, from the first forward

    @torch.no_grad()
    def __call__(self, images: Tensor, keys: Sequence[Hashable]) -> DenseOutput:
        """The model's outputs for `images` [B, 3, H, W], the i-th image being the one `keys[i]` names."""
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if len(missing) == len(keys):  # nothing cached: one forward of the whole batch, as without a cache
            out = self.model(images)
            self._store(out, range(len(keys)), keys)
            return out
        if missing:
            fresh = self.model(images[missing])
            self._store(fresh, range(len(missing)), [keys[i] for i in missing])
        # Every cached key is present now, except past the budget: those images are run again below.
        extra = [i for i, k in enumerate(keys) if k not in self.entries]
        recomputed = dict(zip(extra, _split(self.model(images[extra])))) if extra else {}
        rows = [recomputed[i] if i in recomputed else self.entries[k] for i, k in enumerate(keys)]
        cls = torch.stack([r[0] for r in rows])
        reg = torch.stack([r[1] for r in rows])
        feats = [torch.stack([r[2][level] for r in rows]) for level in range(len(rows[0][2]))]
        return DenseOutput(cls, reg, feats, self._grid)

    def _store(self, out: DenseOutput, rows: Sequence[int] | range, keys: Sequence[Hashable]) -> None:
        self._grid = out.grid
        for i, k in zip(rows, keys):
            if self.full:
                return
            entry = (out.cls[i].clone(), out.reg[i].clone(), [f[i].clone() for f in out.feats])
            size = sum(t.numel() * t.element_size() for t in (entry[0], entry[1], *entry[2]))
            if self.bytes + size > self.max_bytes:
                self.full = True
                log.info(f"{self.name} cache full at {len(self.entries)} images ({self.bytes / 2**30:.2f} GiB, "
                         f"train.teacher_cache_gb): the rest run the {self.name} every time")
                return
            self.entries[k] = entry
            self.bytes += size

    def summary(self) -> str:
        """One log line: what the cache held and how many teacher forwards it saved."""
        total = max(self.hits + self.misses, 1)
        return (f"{self.name} cache: {len(self.entries)} (image, flip) entries, {self.bytes / 2**20:.0f} MiB; "
                f"{self.hits} of {total} image forwards read from memory ({100 * self.hits / total:.0f} %)")


def _split(out: DenseOutput) -> list[Entry]:
    return [(out.cls[i], out.reg[i], [f[i] for f in out.feats]) for i in range(out.cls.shape[0])]
