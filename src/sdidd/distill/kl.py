"""The temperature-scaled distribution KL shared by every box/class distillation term (LD / ERD style)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def distribution_kl(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Per-row T^2 * mean_j p^T_j (log p^T_j - log p^S_j) with p = softmax(logits / T); [N, K] -> [N]."""
    # log_softmax on both sides: stable, and p^T = 0 after underflow still multiplies a finite log.
    log_t = F.log_softmax(teacher_logits.detach() / T, dim=-1)
    log_s = F.log_softmax(student_logits / T, dim=-1)
    # Mean over the K bins (not the sum), as the released KnowledgeDistillationKLDivLoss does.
    return (log_t.exp() * (log_t - log_s)).mean(dim=-1) * (T * T)
