"""BYOT (Zhang et al., ICCV 2019): CE at every exit + KD from the deepest exit + hint towards its feature.

Every variant the reference codebases disagree on is a switch (see README, "BYOT variants"):
  kd="kl" | "soft_ce"        soft-CE differs from KL by the teacher's entropy (same gradient)
  t_squared                  Hinton's T^2 factor (luanyunteng: on; journal code: off)
  hint="sse" | "l2" | "mse"  functional.hint_loss (luanyunteng: sse; journal code: l2)
`byot_terms` is the PyTorch reference the fused Triton kernel must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.objectives.base import Objective, register_objective, summed
from engine.objectives.functional import ce, hint_loss, kd_loss
from engine.objectives.requirements import Requirement
from engine.types import Batch, ExitOutputs, LossOutput
from kernels.multi_exit.options import LossOptions


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


def byot_terms(logits: list[Tensor], features: list[Tensor], targets: Tensor, w: ByotWeights, temperature: float,
               kd: str = "kl", t_squared: bool = True, hint: str = "sse") -> dict[str, Tensor]:
    """Every weighted term by name: ce_i for all exits, kd_i and hint_i for the shallow ones."""
    terms: dict[str, Tensor] = {}
    teacher_logits, teacher_feat = logits[-1], features[-1]
    for i, z in enumerate(logits):
        terms[f"ce_{i}"] = w.ce[i] * ce(z, targets)
    for i, z in enumerate(logits[:-1]):
        terms[f"kd_{i}"] = w.kd[i] * kd_loss(z, teacher_logits, temperature, kd, t_squared)
    for i, f in enumerate(features[:-1]):
        if w.hint[i] != 0:
            terms[f"hint_{i}"] = w.hint[i] * hint_loss(f, teacher_feat, hint)
    return terms


def byot_options(b, weights: ByotWeights) -> LossOptions:
    """The options of BYOT's one launch, from objective.byot and its resolved per-exit weights."""
    hint = b.hint if b.hint != "none" and any(weights.hint) else "none"
    return LossOptions(teacher="deepest", ce_weight=weights.ce, kd_weight=weights.kd, hint_weight=weights.hint,
                       temperature=b.temperature, kd=b.kd, t_squared=b.t_squared, hint=hint)


def byot_names(weights: ByotWeights) -> dict[str, tuple[int, int]]:
    """The logged terms of byot_terms at their (exit, column) of the kernel's losses: ce_i for every exit, kd_i and
    hint_i (nonzero hint weight) for the shallow ones."""
    n = len(weights.ce)
    names = {f"ce_{i}": (i, 0) for i in range(n)}
    names.update({f"kd_{i}": (i, 1) for i in range(n - 1)})
    names.update({f"hint_{i}": (i, 2) for i in range(n - 1) if weights.hint[i] != 0})
    return names


def byot_call(b, weights: ByotWeights):
    """The fused twin of byot_terms (a FusedCall)."""
    from engine.objectives.fused import FusedCall  # loads triton, optional: for this backend only

    return FusedCall(byot_options(b, weights), byot_names(weights))


# a shallow exit to teach: without one, BYOT is the deepest exit's CE scaled by 1 - alpha
SHALLOW_EXIT = Requirement("exits.stages", "min_items", 1, note="a shallow exit to distil into; objective ce trains "
                                                                 "the plain backbone")


@register_objective("byot")
class BYOT(Objective):
    requires = (SHALLOW_EXIT,)
    routed = "every term: ce_i, kd_i, hint_i, in one launch"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        b = cfg.objective.byot
        return byot_options(b, ByotWeights.from_config(b, num_exits))

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.b = cfg.objective.byot
        self.weights = ByotWeights.from_config(self.b, num_exits)
        self.use_fused(self.fused_call(cfg, device, {}, num_exits))  # names: byot_call's own, from the weights

    def fused_twin(self, cfg, names, num_exits: int):
        return byot_call(self.b, self.weights)  # with the weights resolved above, not resolved again

    def torch_terms(self, logits: list[Tensor], labels: Tensor,
                    features: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        b = self.b
        return summed(byot_terms(logits, features, labels, self.weights, b.temperature, b.kd, b.t_squared, b.hint))

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        return LossOutput(*self.compute(out.logits, batch.labels, out.features))
