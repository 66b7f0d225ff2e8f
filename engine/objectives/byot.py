"""BYOT (Zhang et al., ICCV 2019): CE at every exit + KD from the deepest exit + hint towards its feature.

Every variant the reference codebases disagree on is a switch (see README, "BYOT variants"):
  kd="kl" | "soft_ce"        soft-CE differs from KL by the teacher's entropy (same gradient)
  t_squared                  Hinton's T^2 factor (luanyunteng: on; journal code: off)
  hint="sse"                 sum over batch and dims of (f_i - f_C)^2 where (f_i>0)|(f_C>0)   (luanyunteng)
       "l2"                  torch.dist(f_i, f_C): one un-squared L2 norm over the whole batch (journal code)
       "mse"                 mean squared error
These functions are the PyTorch reference the fused Triton kernel must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.objectives.base import Objective, fused_call, register_objective, resolve_backend, sum_terms
from engine.types import Batch, ExitOutputs, LossOutput


@dataclass(frozen=True)
class ByotWeights:
    """Resolved per-exit weights; index i = shallow exit i (0 = shallowest)."""

    ce: tuple[float, ...]  # one per exit including the deepest (last)
    kd: tuple[float, ...]  # one per shallow exit
    hint: tuple[float, ...]  # one per shallow exit (0 = no hint)

    @classmethod
    def from_config(cls, b, num_exits: int) -> "ByotWeights":
        n = num_exits - 1
        ce = list(b.ce_weights) if b.ce_weights is not None else [1 - b.alpha] * n
        ce.append(b.deepest_ce_weight if b.deepest_ce_weight is not None else 1 - b.alpha)
        kd = list(b.kd_weights) if b.kd_weights is not None else [b.alpha] * n
        hint = list(b.hint_weights) if b.hint_weights is not None else [b.beta] * n
        chosen = set(range(n)) if b.hint_exits is None else set(b.hint_exits)
        hint = [w if (i in chosen and b.hint != "none") else 0.0 for i, w in enumerate(hint)]
        return cls(tuple(ce), tuple(kd), tuple(hint))


def upcast(t: Tensor) -> Tensor:
    """Losses accumulate in at least fp32 (fp64 inputs stay fp64, so float64 references compare exactly)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, kind: str = "kl", t_squared: bool = True) -> Tensor:
    """Mean over rows of KL(softmax(t/T) || softmax(s/T)) or of the soft cross-entropy; the teacher is detached."""
    log_q = F.log_softmax(upcast(student) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher.detach()) / temperature, dim=-1)
    p = log_p.exp()
    per_row = (p * (log_p - log_q)).sum(-1) if kind == "kl" else -(p * log_q).sum(-1)
    loss = per_row.mean()
    return loss * temperature**2 if t_squared else loss


def hint_loss(feat: Tensor, target: Tensor, kind: str = "sse") -> Tensor:
    target = upcast(target.detach())
    feat = upcast(feat)
    if kind == "sse":
        mask = ((feat > 0) | (target > 0)).to(feat.dtype)
        return ((feat - target).pow(2) * mask).sum()
    if kind == "l2":
        return torch.dist(feat, target)
    if kind == "mse":
        return F.mse_loss(feat, target)
    raise ValueError(f"unknown hint loss {kind!r}; allowed: sse, l2, mse")


def byot_terms(logits: list[Tensor], features: list[Tensor], targets: Tensor, w: ByotWeights, temperature: float,
               kd: str = "kl", t_squared: bool = True, hint: str = "sse",
               ignore_index: int = -100) -> dict[str, Tensor]:
    """Every weighted term by name: ce_i for all exits, kd_i and hint_i for the shallow ones."""
    terms: dict[str, Tensor] = {}
    teacher_logits, teacher_feat = logits[-1], features[-1]
    for i, z in enumerate(logits):
        terms[f"ce_{i}"] = w.ce[i] * F.cross_entropy(upcast(z), targets, ignore_index=ignore_index)
    for i, z in enumerate(logits[:-1]):
        terms[f"kd_{i}"] = w.kd[i] * kd_loss(z, teacher_logits, temperature, kd, t_squared)
    for i, f in enumerate(features[:-1]):
        if w.hint[i] != 0:
            terms[f"hint_{i}"] = w.hint[i] * hint_loss(f, teacher_feat, hint)
    return terms


@register_objective("byot")
class BYOT(Objective):
    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        if num_exits < 2:
            raise ValueError("objective 'byot' needs at least one shallow exit (exits.stages is empty); use 'ce'")
        self.b = cfg.objective.byot
        self.weights = ByotWeights.from_config(self.b, num_exits)
        self.fused = None
        if resolve_backend(cfg.objective.backend, device) == "triton":
            from engine.objectives.fused import byot_call  # triton loads with this backend only

            self.fused = byot_call(self.b, self.weights)

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        if self.fused is not None:
            return LossOutput(*self.fused(out.logits, batch.labels, out.features))
        terms = byot_terms(out.logits, out.features, batch.labels, self.weights, self.b.temperature, self.b.kd,
                           self.b.t_squared, self.b.hint)
        return sum_terms(terms)


@register_objective("ce")
class CrossEntropy(Objective):
    """Plain CE on the deepest exit: the single-exit baseline (shallow exits, if any, get no loss)."""

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.fused = fused_call(cfg, device, {"ce": (0, 0)})

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        if self.fused is not None:
            return LossOutput(*self.fused(out.logits[-1], batch.labels))
        return sum_terms({"ce": F.cross_entropy(upcast(out.logits[-1]), batch.labels)})
