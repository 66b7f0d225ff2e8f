"""The objectives' fused-kernel backend (objective.backend = triton, or auto on CUDA).

`loss_options` turns an objective's config into the kernels.multi_exit.options.LossOptions of its fused call; the
objectives, the benchmarks and the tests all build their options here. A fused call gives the differentiable
total of its weighted terms and the terms themselves: the objective backpropagates through the total (one sum,
no per-term selects in the graph) and logs the terms detached.

`objective.log_eps` goes into the options here exactly as the PyTorch path uses it (base.log_eps).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from engine.config import ConfigError
from engine.objectives.base import log_eps
from engine.objectives.byot import ByotWeights
from kernels.multi_exit.op import fused_loss
from kernels.multi_exit.options import LossOptions


def byot_options(b, weights: ByotWeights) -> LossOptions:
    """The options of BYOT's one launch, from objective.byot and its resolved per-exit weights."""
    hint = b.hint if b.hint != "none" and any(weights.hint) else "none"
    return LossOptions(teacher="deepest", ce_weight=weights.ce, kd_weight=weights.kd, hint_weight=weights.hint,
                       temperature=b.temperature, kd=b.kd, t_squared=b.t_squared, hint=hint)


def cskd_options(cfg, with_ce: bool = True) -> LossOptions:
    """CE + lam T^2 KL(partner || anchor) on one exit; the partner logits are the external teacher."""
    c = cfg.objective.cskd
    return LossOptions(teacher="logits", ce_weight=1.0 if with_ce else 0.0, kd_weight=c.lam, temperature=c.temperature,
                       kd="kl", t_squared=True)


def loss_options(cfg, num_exits: int) -> LossOptions:
    """The options of objective `cfg.objective.name`'s fused call (for CS-KD: the anchor/partner one)."""
    o, name = cfg.objective, cfg.objective.name
    eps = log_eps(cfg)
    if name in ("byot", "byot_cskd"):
        return byot_options(o.byot, ByotWeights.from_config(o.byot, num_exits))
    if name in ("ce", "dsn"):
        return LossOptions(teacher="none")
    if name == "label_smoothing":
        return LossOptions(teacher="none", label_smoothing=o.label_smoothing.epsilon,
                           smoothing_convention=o.label_smoothing.convention, log_eps=eps)
    if name == "kd":
        t = o.teacher
        return LossOptions(teacher="logits", ce_weight=1 - t.alpha, kd_weight=t.alpha, temperature=t.temperature,
                           kd="kl", t_squared=True)
    if name == "sd_generation":
        t = o.teacher
        return LossOptions(teacher="logits", ce_weight=1 - t.alpha, kd_weight=t.alpha, temperature=t.temperature,
                           kd="soft_ce", t_squared=t.t_squared, scale_student=t.scale_student, log_eps=eps)
    if name == "beta":
        return LossOptions(teacher="closed_form", ce_weight=1 - o.beta.alpha, kd_weight=o.beta.alpha, kd="soft_ce",
                           log_eps=eps)
    if name == "cskd":
        return cskd_options(cfg)
    if name == "mixup_cskd":
        return cskd_options(cfg, with_ce=False)
    raise ConfigError(f"objective.backend: objective {o.name!r} has no fused-kernel form; use objective.backend=torch")


class FusedCall:
    """One fused call of an objective, its options and term names fixed at construction. A call returns
    (differentiable total, {name: detached term}); `names` maps each logged term to its (exit, column) in the
    [E, 3] losses (column 0 ce, 1 kd, 2 hint). A single [B, C] tensor is one exit."""

    def __init__(self, opts: LossOptions, names: dict[str, tuple[int, int]]):
        self.opts, self.names = opts, names
        self.flat = [(name, 3 * e + k) for name, (e, k) in names.items()]

    def __call__(self, logits: Tensor | list[Tensor], targets: Tensor, features: Optional[list[Tensor]] = None,
                 teacher_logits: Optional[Tensor] = None,
                 soft_b: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        zs = [logits] if isinstance(logits, Tensor) else logits
        total, losses = fused_loss(zs, targets, self.opts, features=features, teacher_logits=teacher_logits,
                                   soft_b=soft_b)
        values = losses.detach().view(-1).unbind(0)  # one call for every term's view
        return total, {name: values[i] for name, i in self.flat}


def byot_call(b, weights) -> FusedCall:
    """The fused twin of byot.byot_terms: ce_i for every exit, kd_i and hint_i (nonzero hint weight) for the
    shallow ones."""
    n = len(weights.ce)
    names = {f"ce_{i}": (i, 0) for i in range(n)}
    names.update({f"kd_{i}": (i, 1) for i in range(n - 1)})
    names.update({f"hint_{i}": (i, 2) for i in range(n - 1) if weights.hint[i] != 0})
    return FusedCall(byot_options(b, weights), names)
