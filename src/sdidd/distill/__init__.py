"""Distillation losses: HCCD / ERD-cls, ERD-box, DSCRD (LD on ATSS positives + VLR), IDFD, the new-class teacher and the shared KL."""
from .classification import confident_mask, hccd_loss
from .erd_box import box_logit_mask, decode_teacher_boxes, erd_box_loss
from .feature import idfd_loss
from .kl import distribution_kl
from .new_teacher import new_class_positives, new_teacher_loss
from .regression import dscrd_loss, kd_mismatch_loss

__all__ = [
    "box_logit_mask",
    "confident_mask",
    "decode_teacher_boxes",
    "distribution_kl",
    "dscrd_loss",
    "erd_box_loss",
    "hccd_loss",
    "idfd_loss",
    "kd_mismatch_loss",
    "new_class_positives",
    "new_teacher_loss",
]
