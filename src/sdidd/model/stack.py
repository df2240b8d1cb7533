"""Several GFL detectors answering together: each for the classes its step added (method `two-models`).

The first member (the model the incremental steps started from) answers for its classes, each later member (a
fine-tune of one step, trained on that step's new classes only) for the classes its step added. A later member's
scores are damped where an earlier one sees a defect: times (1 - the best earlier-class score at that anchor)^damp,
because a model trained on new-class labels only fires its new classes on old defects it never saw labelled
"not new" (docs/METHOD_NOTES.md, "Two models at inference"). No member forgets: the earlier ones stay frozen.

When the newest member was trained with replayed old images (`incremental.replay_images`), it has seen the old
classes labelled beside its new ones, so it knows a new defect is not an old one, which the earlier members, that
never saw the later defects, do not. Then each earlier member's score is blended with the newest member's score
for the same class, s^(1-b) * q^b (`incremental.old_score_blend` b): an earlier member firing on a later defect is
outvoted there ("Two models with replay" in the notes).

The members' dense outputs are joined along the anchor axis (each member's anchors carry only its own classes'
scores, the others at sigmoid 1e-13, below any score threshold), so GFL's post-processing, evaluation and prediction
run unchanged, NMS within each class. Inference costs one forward per member.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .anchors import AnchorGrid
from .detector import GFL, DenseOutput

__all__ = ["ModelStack", "stack_scores", "stacked", "newest"]


def stack_scores(probs: Sequence[Tensor], ends: Sequence[int], damp: float, blend: float = 0.0) -> list[Tensor]:
    """Each member's [B, A, C] class probabilities restricted to its classes, later members damped by earlier ones.

    `probs[i]` holds member i's sigmoid scores (at least `ends[i]` channels); member i answers for channels
    `ends[i-1]:ends[i]`. Every returned tensor has `ends[-1]` channels, zeros outside the member's range.
    `blend` b > 0: an earlier member's score s becomes s^(1-b) * q^b, q the newest member's score for that class
    (after the damping, which reads the earlier members' own scores).
    """
    total = ends[-1]
    out: list[Tensor] = []
    best_before = None  # [B, A, 1] the best score of the classes answered so far, at each anchor
    for i, (p, end) in enumerate(zip(probs, ends)):
        start = ends[i - 1] if i else 0
        own = p[..., start:end]
        if best_before is not None and damp:
            own = own * (1 - best_before).clamp_min(0) ** damp
        best = own.amax(-1, keepdim=True)
        best_before = best if best_before is None else torch.maximum(best_before, best)
        if blend and i < len(probs) - 1:  # the newest member votes on the classes it saw replayed
            own = own.clamp_min(1e-12) ** (1 - blend) * probs[-1][..., start:end].clamp_min(1e-12) ** blend
        out.append(torch.cat([own.new_zeros(*own.shape[:-1], start), own, own.new_zeros(*own.shape[:-1], total - end)], -1))
    return out


class ModelStack(nn.Module):
    """Detectors answering for consecutive class ranges, joined into one dense output (see the module docstring)."""

    def __init__(self, members: Sequence[GFL], ends: Sequence[int], damp: float = 1.0, blend: float = 0.0) -> None:
        super().__init__()
        if len(members) != len(ends) or list(ends) != sorted(set(ends)) or any(m.num_classes < e for m, e in zip(members, ends)):
            raise ValueError(f"members with {[m.num_classes for m in members]} classes cannot answer up to {list(ends)}")
        self.members = nn.ModuleList(members)
        self.ends = list(ends)
        self.damp = float(damp)
        self.blend = float(blend)

    @property
    def num_classes(self) -> int:
        return self.ends[-1]

    @property
    def cfg(self):  # the newest member's architecture record (backbone, sizes) stands for the stack's
        return self.members[-1].cfg

    def forward(self, images: Tensor) -> DenseOutput:
        """One dense output over every member's anchors, each carrying only its own classes."""
        outs = [m(images) for m in self.members]
        probs = stack_scores([o.cls.float().sigmoid() for o in outs], self.ends, self.damp, self.blend)
        cls = torch.cat([torch.logit(p.clamp(1e-13, 1 - 1e-7)) for p in probs], dim=1)
        grids = [o.grid for o in outs]
        grid = AnchorGrid(torch.cat([g.points for g in grids]), torch.cat([g.strides for g in grids]),
                          [n for g in grids for n in g.num_per_level], [s for g in grids for s in g.sizes])
        return DenseOutput(cls, torch.cat([o.reg.float() for o in outs], dim=1), [], grid)

    # GFL's post-processing reads only the dense output, so the stack uses it as is (one function, not a copy).
    postprocess = GFL.postprocess
    predict = GFL.predict


def stacked(old: GFL | ModelStack, new: GFL, damp: float, blend: float = 0.0) -> ModelStack:
    """`old` (a detector or a stack) answering for its classes and `new` for the ones it adds."""
    members, ends = (list(old.members), list(old.ends)) if isinstance(old, ModelStack) else ([old], [old.num_classes])
    return ModelStack(members + [new], ends + [new.num_classes], damp, blend)


def newest(model: GFL | ModelStack) -> GFL:
    """The detector a next step starts from: the model itself, or a stack's newest member."""
    return model.members[-1] if isinstance(model, ModelStack) else model
