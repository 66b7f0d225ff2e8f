"""Label smoothing on the deepest exit, in the two conventions the papers' code uses
(objective.label_smoothing.convention, eps = objective.label_smoothing.epsilon):

  wrong_classes  1 - eps on the true class and eps/(K-1) on each wrong one (the Beta-smoothing code's
                 `soft_cce_loss`, with its log(p + 1e-8): objective.log_eps)
  all_classes    (1 - eps)·onehot + eps/K on every class (Szegedy et al.; PyTorch's `label_smoothing=eps`)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.objectives.base import Objective, log_eps, register_objective, summed
from engine.objectives.functional import LOG_EPS, soft_target_ce, upcast
from engine.types import Batch, ExitOutputs, LossOutput
from kernels.multi_exit.options import LossOptions

# the eps of log(p + eps) in each convention's official form: the Beta-smoothing code's, and PyTorch's exact one
OFFICIAL_LOG_EPS = {"wrong_classes": LOG_EPS, "all_classes": 0.0}


def ls_wrong_classes_target(labels: Tensor, num_classes: int, eps: float, dtype=torch.float32) -> Tensor:
    """1 - eps on the true class, eps/(K-1) on each of the K-1 others (rows sum to 1)."""
    on = F.one_hot(labels, num_classes).to(dtype)
    return on * (1.0 - eps) + (1.0 - on) * (eps / (num_classes - 1))


def ls_all_classes_target(labels: Tensor, num_classes: int, eps: float, dtype=torch.float32) -> Tensor:
    """(1 - eps)·onehot + eps/K on every class, true one included (PyTorch's convention)."""
    return F.one_hot(labels, num_classes).to(dtype) * (1.0 - eps) + eps / num_classes


def ls_wrong_classes_loss(logits: Tensor, labels: Tensor, eps: float, log_eps: float = LOG_EPS) -> Tensor:
    z = upcast(logits)
    return soft_target_ce(z, ls_wrong_classes_target(labels, z.shape[-1], eps, z.dtype), log_eps)


def ls_all_classes_loss(logits: Tensor, labels: Tensor, eps: float, log_eps: float = 0.0) -> Tensor:
    z = upcast(logits)
    if log_eps > 0:
        return soft_target_ce(z, ls_all_classes_target(labels, z.shape[-1], eps, z.dtype), log_eps)
    return F.cross_entropy(z, labels, label_smoothing=eps)


LS_LOSSES = {"wrong_classes": ls_wrong_classes_loss, "all_classes": ls_all_classes_loss}


@register_objective("label_smoothing")
class LabelSmoothing(Objective):
    soft_targets = True
    routed = "ls, in either convention (eps/(K-1) per wrong class, or eps/K on every class)"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        ls = cfg.objective.label_smoothing
        return LossOptions(teacher="none", label_smoothing=ls.epsilon, smoothing_convention=ls.convention,
                           log_eps=log_eps(cfg))

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        ls = cfg.objective.label_smoothing
        self.eps, self.convention = ls.epsilon, ls.convention
        self.log_eps = log_eps(cfg)
        self.use_fused(self.fused_call(cfg, device, {"ls": (0, 0)}))

    @classmethod
    def default_log_eps(cls, cfg) -> float:
        return OFFICIAL_LOG_EPS[cfg.objective.label_smoothing.convention]

    def torch_terms(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed({"ls": LS_LOSSES[self.convention](logits, labels, self.eps, self.log_eps)})

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        return LossOutput(*self.compute(out.logits[-1], batch.labels))
