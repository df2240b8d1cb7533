"""Teacher/student set-up of an incremental step: freeze the teacher, extend the student's class layer."""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from ..errors import SdiddError
from ..model.detector import GFL


def freeze_teacher(model: GFL) -> GFL:
    """Eval mode and no gradients: the teacher only provides targets."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def extend_student(teacher: GFL, num_classes: int, new_class_init: str = "prior") -> GFL:
    """Copy of the teacher whose class layer has `num_classes` outputs.

    Old rows are copied exactly, so old-class outputs equal the teacher's at step start. New rows get
    GFL's Normal(0, 0.01) + prior bias ('prior', default) or PyTorch's default conv init ('default',
    as in the released code, where new classes start near sigmoid 0.5).
    """
    num_old = teacher.num_classes
    if num_classes <= num_old:
        raise SdiddError(f"a student needs more classes than its teacher ({num_classes} <= {num_old})")
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    student.cfg = dataclasses.replace(teacher.cfg, num_classes=num_classes, pretrained=False)
    old = teacher.head.gfl_cls
    new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, padding=old.padding)  # PyTorch default init
    if new_class_init == "prior":
        nn.init.normal_(new.weight, std=0.01)
        nn.init.constant_(new.bias, -math.log((1 - student.head.prior_prob) / student.head.prior_prob))
    with torch.no_grad():
        new.weight[:num_old].copy_(old.weight)
        new.bias[:num_old].copy_(old.bias)
    student.head.gfl_cls = new.to(old.weight.device)
    student.head.num_classes = num_classes
    # Re-apply the backbone's frozen stages (deepcopy of a frozen teacher left everything frozen above).
    student.backbone.apply_freeze()
    student.train()
    return student
