"""New-class teacher (sdidd+ part b): a model that already knows the new classes distils their outputs.

The old teacher's pull holds the old classes but also drags the new ones towards a model that never saw
them: DSCRD's LD, for one, makes the student's boxes on new-class objects copy the OLD teacher's boxes
there. A second teacher, trained on the new data (by default a fine-tune of the old teacher,
``distill.new_teacher=finetune``), gives the new classes their own targets:

* classification: the student's new-class scores follow the new teacher's on the anchors where the new
  teacher is confident (mean + 2·std per image, as HCCD), as a cross-entropy on scores that is 0 when
  they agree (the ``bce`` form of :func:`~sdidd.distill.classification.hccd_loss`);
* boxes: on ATSS positives of new-class boxes, LD's distribution KL takes the new teacher's box
  distributions as the target, in place of the old teacher's (the objective then drops the old
  teacher's LD there; its VLR term stays).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model.assigner import Assignment
from .classification import hccd_loss
from .kl import distribution_kl


def new_class_positives(assignment: Assignment, num_old: int) -> Tensor:
    """[B, A] bool: ATSS positives whose assigned ground-truth box is of a new class (channel >= num_old)."""
    return assignment.pos_mask & (assignment.assigned_labels >= num_old)


def new_teacher_loss(
    student_cls: Tensor,
    student_reg: Tensor,
    new_cls: Tensor,
    new_reg: Tensor,
    assignment: Assignment,
    num_old: int,
    T: float = 10.0,
    cls_weight: float = 1.0,
    ld_weight: float = 0.25,
    min_score: float = 0.0,
    valid: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Classification ('new_cls') and box ('new_ld') terms towards the new teacher, summed over the batch.

    `new_cls` [B, A, N] are the new teacher's logits of the step's N new classes, in the student's order
    (channels num_old.. of the student); `new_reg` [B, A, 4, R+1] its box distributions. Both terms are 0
    when the student's outputs equal the new teacher's. Returns the two losses and their anchor counts
    ('n_new_cls', 'n_new_ld'), all 0-dim tensors.
    """
    s_new = student_cls[..., num_old:]
    cls, n_cls = hccd_loss(s_new, new_cls, weight=cls_weight, min_score=min_score, valid=valid, form="bce")
    pos = new_class_positives(assignment, num_old)
    with torch.no_grad():  # LD's weight: the student's own new-class quality score at the positive, detached
        w = s_new.detach().sigmoid().amax(dim=-1) * pos.to(s_new.dtype)
    bins = student_reg.shape[-1]
    kl = distribution_kl(student_reg.reshape(-1, bins), new_reg.reshape(-1, bins), T).view(*pos.shape, 4).sum(-1)
    ld = (w.to(kl.dtype) * kl).sum() / 4.0
    return {"new_cls": cls, "new_ld": ld_weight * ld, "n_new_cls": n_cls, "n_new_ld": pos.sum()}
