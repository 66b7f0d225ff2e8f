"""Confidence penalty (Pereyra et al. 2017) on the deepest exit, as the Beta-smoothing code's `ent_reg`:
CE - beta·H(p), beta = objective.max_entropy.beta. Always PyTorch: the entropy of the student's own prediction
has no kernel term."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.objectives.base import Objective, register_objective, sum_terms
from engine.objectives.functional import ce, upcast
from engine.types import Batch, ExitOutputs, LossOutput


def entropy(logits: Tensor) -> Tensor:
    """Mean over rows of H(softmax(z)) = -sum_k p_k log p_k."""
    log_p = F.log_softmax(upcast(logits), -1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def max_entropy_terms(logits: Tensor, labels: Tensor, beta: float) -> dict[str, Tensor]:
    return {"ce": ce(logits, labels), "entropy": -beta * entropy(logits)}


@register_objective("max_entropy")
class MaxEntropy(Objective):
    torch_only = "the entropy bonus of the student's own prediction has no kernel term"

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.beta = cfg.objective.max_entropy.beta

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        return sum_terms(max_entropy_terms(out.logits[-1], batch.labels, self.beta))
