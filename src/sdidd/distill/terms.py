"""Every distillation term of a step in one table: its switch, what it reads, and how it is computed.

A term is an entry of :data:`TERMS` (a dict of frozen dataclasses, in the order the losses are summed). The
objective (``engine/objective.py``) builds the step's shared :class:`TermInputs` once (fp32 outputs, the ATSS
assignment, HCCD's selection) and runs each entry whose switch is on; the trainer runs a teacher's forward
only when an enabled term reads it (:func:`reads_teacher`). A new term is its loss module plus one entry here
with no switch (``enabled=None``): it runs when ``distill.terms`` names it, with the weight given there
(:meth:`TermInputs.weight`), from the command line (``distill.terms={name: 0.5}``) or a method of ``methods.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from torch import Tensor

from ..model.assigner import Assignment
from ..model.detector import DenseOutput
from .classification import hccd_loss
from .erd_box import erd_box_loss
from .feature import idfd_loss
from .new_teacher import new_class_positives, new_teacher_loss
from .regression import dscrd_loss, kd_mismatch_loss, teacher_box_fit

if TYPE_CHECKING:
    from ..config import DistillConfig

Parts = tuple[dict[str, Tensor], dict[str, Tensor]]  # (losses by name, counts by name), all 0-dim tensors


@dataclass(frozen=True)
class TermInputs:
    """What the terms of one step read, computed once: fp32 outputs, the shared assignment and selections."""

    s_cls: Tensor  # [B, A, C] student logits (old channels first)
    s_reg: Tensor  # [B, A, 4, R+1] student box distributions
    student: DenseOutput  # for the FPN features and the anchor grid
    t_cls: Tensor  # [B, A, C_old] old teacher
    t_reg: Tensor
    teacher: DenseOutput
    asg: Assignment
    valid: Tensor  # [B, A] anchors inside each unpadded image
    confident: Optional[Tensor]  # [B, A] HCCD's selection (mu+2sigma and the score floor), when HCCD is on
    per_batch: float  # batch-summed terms on the release's per-batch-of-2 scale
    cfg: "DistillConfig"
    new_teacher: Optional[DenseOutput] = None  # a model of the new classes (distill.new_teacher), its outputs
    new_channels: Optional[Tensor] = None  # [N] its channels of the step's new classes

    def weight(self, name: str) -> float:
        """The weight `distill.terms` gives term `name` (a term switched on by its name)."""
        return self.cfg.terms[name]

    @property
    def num_old(self) -> int:
        """Channels the old teacher knows."""
        return self.t_cls.shape[-1]

    @property
    def new_slice(self) -> slice:
        """The student's channels of the classes the old teacher does not know."""
        return slice(self.num_old, self.s_cls.shape[-1])


@dataclass(frozen=True)
class Term:
    """One distillation term: when it runs, whether it needs the new-class teacher, and its computation."""

    summary: str
    enabled: Optional[Callable[["DistillConfig"], bool]]  # None: on when `distill.terms` names it
    compute: Callable[[TermInputs], Parts]
    needs_new_teacher: bool = False  # else it reads the old teacher's outputs


def switched_by_name(term: Term) -> bool:
    """Whether `term` has no switch of its own in DistillConfig (it runs when `distill.terms` names it)."""
    return term.enabled is None


def is_enabled(name: str, term: Term, d: "DistillConfig") -> bool:
    """Whether term `name` runs under `d` (its own switch, or its name in `distill.terms` with a weight above 0)."""
    if term.enabled is None:
        return d.terms.get(name, 0.0) > 0
    return term.enabled(d)


def _hccd(x: TermInputs) -> Parts:
    loss, n = hccd_loss(x.s_cls, x.t_cls, weight=x.cfg.hccd_weight * x.per_batch, form=x.cfg.hccd_form or "l2",
                        mask=x.confident)
    return {"hccd": loss}, {"n_hccd": n}


def _erd_box(x: TermInputs) -> Parts:
    grid = x.student.grid
    loss, n = erd_box_loss(x.s_cls, x.s_reg, x.t_cls, x.t_reg, grid.points, grid.strides, nms_iou=x.cfg.erd_box_nms_iou,
                           T=x.cfg.temperature, weight=x.cfg.erd_box_weight * x.per_batch,
                           scale_by_stride=x.cfg.erd_box_stride_fix, valid=x.valid)
    return {"erd_box": loss}, {"n_erd_box": n}


def _dscrd(x: TermInputs) -> Parts:
    # With a new-class teacher, the boxes of new-class positives are distilled from it, not from the old teacher.
    exclude = new_class_positives(x.asg, x.num_old) if x.new_teacher is not None else None
    fit = teacher_box_fit(x.t_reg, x.asg, x.student.grid) if x.cfg.dscrd_teacher_iou else None
    r = dscrd_loss(x.s_cls, x.s_reg, x.t_reg, x.asg, x.new_slice, T=x.cfg.temperature,
                   ld_weight=x.cfg.ld_weight * x.per_batch, vlr_weight=x.cfg.vlr_weight * x.per_batch, exclude=exclude,
                   teacher_fit=fit)
    return {"ld": r["ld"], "vlr": r["vlr"]}, {"n_ld": r["n_pos"], "n_vlr": r["n_vlr"]}


def _idfd(x: TermInputs) -> Parts:
    loss, n = idfd_loss(x.student.feats, x.teacher.feats, x.asg, ratio=x.cfg.idfd_ratio, weight=x.cfg.idfd_weight,
                        zero_levels_without_positives=x.cfg.idfd_zero_levels_without_positives,
                        normalize=x.cfg.idfd_normalize)
    return {"idfd": loss}, {"n_idfd": n}


def _new_teacher(x: TermInputs) -> Parts:
    assert x.new_teacher is not None and x.new_channels is not None
    r = new_teacher_loss(x.s_cls, x.s_reg, x.new_teacher.cls.float().index_select(-1, x.new_channels),
                         x.new_teacher.reg.float(), x.asg, x.num_old, T=x.cfg.temperature,
                         cls_weight=x.cfg.new_teacher_weight * x.per_batch, ld_weight=x.cfg.ld_weight * x.per_batch,
                         min_score=x.cfg.hccd_min_score or 0.0, valid=x.valid)
    return {"new_cls": r["new_cls"], "new_ld": r["new_ld"]}, {"n_new_cls": r["n_new_cls"], "n_new_ld": r["n_new_ld"]}


def _kd_mismatch(x: TermInputs) -> Parts:
    loss = kd_mismatch_loss(x.s_cls, x.t_cls, x.asg.pos_mask, x.new_slice, weight=x.cfg.kd_weight,
                            num_per_level=x.student.grid.num_per_level)
    return {"kd": loss}, {}


TERMS: dict[str, Term] = {
    "hccd": Term("(1) HCCD: the old classes' scores at the teacher's confident anchors", lambda d: bool(d.hccd), _hccd),
    "erd_box": Term("ERD's elastic box distillation at the teacher's confident box sides", lambda d: bool(d.erd_box),
                    _erd_box),
    "dscrd": Term("(2) DSCRD: box distributions on ATSS positives (LD) and in the VLR ring", lambda d: bool(d.dscrd),
                  _dscrd),
    "idfd": Term("(3) IDFD: FPN features on the IoU-driven fine-grained mask", lambda d: bool(d.idfd), _idfd),
    "new_teacher": Term("a new-class teacher's scores and boxes for the new classes", lambda d: bool(d.new_teacher),
                        _new_teacher, needs_new_teacher=True),
    "kd_mismatch": Term("as released: new-class student vs old-class teacher logits (ablation only)",
                        lambda d: bool(d.kd_mismatch), _kd_mismatch),
}


def reads_teacher(d: "DistillConfig") -> bool:
    """Whether an enabled term reads the old teacher's outputs (else its forward is skipped)."""
    return any(is_enabled(n, t, d) and not t.needs_new_teacher for n, t in TERMS.items())
