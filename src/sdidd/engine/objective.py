"""The training objective of a step: GFL on the trained channels plus the method's distillation terms.

One label space: labels are model-channel indices (old classes first); ``trained`` [C] says which
channels get GT (QFL) supervision. ATSS runs once per step (:func:`assign_targets`) and its
Assignment feeds GFL and every distillation term; the terms are the entries of ``distill/terms.py``'s
table, run in its order when their switch is on. The loss path has no host syncs except ERD-box's NMS (one
``nonzero`` + one ``batched_nms`` over the batch, see ``distill/erd_box.py``); every count and log
entry is a detached 0-dim tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import DistillConfig, LossConfig
from ..distill import confident_mask
from ..distill.terms import TERMS, TermInputs, is_enabled
from ..model.detector import DenseOutput
from ..model.gfl_loss import assign_targets, gfl_loss


def step_loss(student: DenseOutput, teacher: Optional[DenseOutput], gt_boxes: Tensor, gt_labels: Tensor,
              image_sizes: Tensor, trained: Tensor, loss_cfg: LossConfig, qfl_weight: float,
              distill: Optional[DistillConfig], new_teacher: Optional[DenseOutput] = None,
              new_channels: Optional[Tensor] = None, pseudo_channels: Optional[Tensor] = None,
              at_positives: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and a log dict of detached 0-dim tensors: 'loss', 'loss_<part>' per term and the 'n_*' counts.

    gt_boxes [B, G, 4] xyxy input pixels and gt_labels [B, G] (model channels, -1 = padding) are the
    step's GTs (the new classes in an incremental step); image_sizes [B, 2] (h, w) locate each image in
    the padded canvas. Distillation runs when both `teacher` and `distill` are given; the old classes
    are the teacher's channels, the new ones the student's channels from there on. `new_teacher` (with
    `new_channels` [N], its channels of the step's new classes) distils the new classes' scores and boxes.
    `trained` and `pseudo_channels` are [C], or [B, C] per image (a replayed old image supervises its old channels
    from labels). `pseudo_channels`: the old channels trained on pseudo-labels; with `distill.pseudo_ignore_confident`
    their QFL skips the anchors HCCD distils (no pseudo-label there, yet the teacher is confident). `at_positives`
    [B, C]: channels an image supervises on its positive anchors only (a replayed old image's new classes: 0 there).
    """
    grid = student.grid
    asg = assign_targets(grid, gt_boxes, gt_labels)
    distilling = teacher is not None and distill is not None
    confident, qfl_ignore = None, None
    if distilling:
        # mu+2sigma statistics only over anchors inside each unpadded image (padding is not image content).
        valid = grid.valid_mask(image_sizes)
        ignore = pseudo_channels is not None and bool(distill.pseudo_ignore_confident)
        if distill.hccd or ignore:  # HCCD's selection, computed once (the hccd term reads it)
            confident = confident_mask(teacher.cls.float(), min_score=distill.hccd_min_score or 0.0, valid=valid)  # [B, A]
            if distill.hccd_outside_new:  # the new label says "not an old defect" there, whatever the teacher says
                confident = confident & ~asg.inside_boxes(min_label=teacher.cls.shape[-1])
        if ignore:
            pc = pseudo_channels.to(confident.device)
            qfl_ignore = (confident & ~asg.pos_mask)[..., None] & (pc[:, None, :] if pc.dim() == 2 else pc)
    if at_positives is not None:  # QFL on those channels at the image's positive anchors only
        atp = at_positives.to(trained.device)
        off = atp[:, None, :] & ~asg.pos_mask[..., None]
        qfl_ignore = off if qfl_ignore is None else qfl_ignore | off
        trained = trained | atp
    parts = gfl_loss(student.cls, student.reg, grid, asg, trained, qfl_weight, loss_cfg.giou, loss_cfg.dfl,
                     qfl_ignore=qfl_ignore)
    losses: dict[str, Tensor] = {k: v for k, v in parts.items() if k != "num_pos"}
    counts: dict[str, Tensor] = {"n_pos": parts["num_pos"]}

    if distilling:
        s_cls, t_cls = student.cls.float(), teacher.cls.float()
        x = TermInputs(s_cls, student.reg.float(), student, t_cls, teacher.reg.float(), teacher, asg, valid, confident,
                       # Batch-summed terms are put on the release's per-batch-of-2 scale (DistillConfig.release_batch).
                       distill.release_batch / s_cls.shape[0] if distill.release_batch else 1.0, distill,
                       new_teacher, new_channels)
        for name, term in TERMS.items():  # in the table's order, which is the order the losses are summed in
            if (new_teacher is not None) if term.needs_new_teacher else is_enabled(name, term, distill):
                term_losses, term_counts = term.compute(x)
                losses.update(term_losses)
                counts.update(term_counts)
    total = torch.stack([v.float() for v in losses.values()]).sum()
    log: dict[str, Tensor] = {"loss": total.detach()}
    log.update({f"loss_{k}": v.detach().float() for k, v in losses.items()})
    log.update({k: v.detach().float() for k, v in counts.items()})
    return total, log
