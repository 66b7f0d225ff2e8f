"""Objective-level entry points of the fused loss: the same names and values as the PyTorch objectives.

Every function returns a dict of named, already-weighted scalar terms (fp32, on device, differentiable) ready for
`engine.objectives.base.sum_terms`. `logits` may be one [B, C] tensor (terms named `<name>`) or a list of exits
(terms named `<name>_{i}`); the exits' tensors are never stacked.

    byot_terms_triton(logits: list[Tensor], features: list[Tensor], targets: Tensor, weights: ByotWeights,
                      b: ByotConfig, ignore_index: int = -100) -> dict[str, Tensor]
        = engine.objectives.byot.byot_terms(...): ce_{i} for every exit, kd_{i} and hint_{i} (nonzero hint weight)
        for the shallow ones; teacher = the deepest exit, detached.

    ce_terms_triton(logits, targets, *, weight=1.0, label_smoothing=0.0, convention="wrong_classes",
                    ignore_index=-100) -> {"ce"}
        CE, optionally label-smoothed: convention "wrong_classes" = eps/(K-1) on each wrong class (Beta code),
        "all_classes" = eps/K on every class (= F.cross_entropy(label_smoothing=eps)).

    kd_terms_triton(logits, teacher_logits, targets, *, ce_weight, kd_weight, temperature, kd="kl",
                    t_squared=False, scale_student=True, label_smoothing=0.0, convention="wrong_classes",
                    ignore_index=-100) -> {"ce", "kd"}
        Classic KD / multi-generation SD / CS-KD (teacher_logits = the no-grad partner's logits [B, C]):
        ce_weight * CE + kd_weight * (T^2 if t_squared) * mean_rows KL(softmax(t/T) || softmax(s/Ts)),
        Ts = T if scale_student else 1 (TeacherKDConfig.scale_student), kd="soft_ce" drops the teacher entropy.
        CS-KD: kd_terms_triton(anchor, partner, y, ce_weight=1, kd_weight=lam, temperature=T, t_squared=True).

    soft_target_terms_triton(logits, targets, b, *, ce_weight=0.0, soft_weight=1.0, kind="soft_ce",
                             temperature=1.0, t_squared=False, ignore_index=-100) -> {"ce", "soft"}
        Beta smoothing: target b_i on the label and (1-b_i)/(K-1) elsewhere, b [B] per row (never built as
        [B, K]); soft_weight * mean over labelled rows of the soft CE (or KL) + ce_weight * hard CE.

All of them run kernels.multi_exit_loss.multi_exit_loss; see its docstring for devices, dtypes and autograd.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from kernels.multi_exit_loss import multi_exit_loss


def _named(losses: Tensor, columns: dict[str, int], single: bool) -> dict[str, Tensor]:
    if single:
        return {name: losses[0, col] for name, col in columns.items()}
    return {f"{name}_{i}": losses[i, col] for name, col in columns.items() for i in range(losses.shape[0])}


def byot_terms_triton(logits: list[Tensor], features: list[Tensor], targets: Tensor, weights, b,
                      ignore_index: int = -100) -> dict[str, Tensor]:
    """Fused twin of engine.objectives.byot.byot_terms (weights: ByotWeights, b: ByotConfig)."""
    n = len(logits)
    hint = b.hint if b.hint != "none" and any(weights.hint) else "none"
    losses = multi_exit_loss(logits, targets, features=features if hint != "none" else None, teacher="deepest",
                             ce_weight=weights.ce, kd_weight=weights.kd, hint_weight=weights.hint,
                             temperature=b.temperature, kd=b.kd, t_squared=b.t_squared, hint=hint,
                             ignore_index=ignore_index)
    terms = {f"ce_{i}": losses[i, 0] for i in range(n)}
    terms.update({f"kd_{i}": losses[i, 1] for i in range(n - 1)})
    terms.update({f"hint_{i}": losses[i, 2] for i in range(n - 1) if weights.hint[i] != 0})
    return terms


def ce_terms_triton(logits: Tensor | Sequence[Tensor], targets: Tensor, *, weight: float = 1.0,
                    label_smoothing: float = 0.0, convention: str = "wrong_classes",
                    ignore_index: int = -100) -> dict[str, Tensor]:
    single = isinstance(logits, Tensor)
    losses = multi_exit_loss([logits] if single else logits, targets, teacher="none", ce_weight=weight,
                             label_smoothing=label_smoothing, smoothing_convention=convention,
                             ignore_index=ignore_index)
    return _named(losses, {"ce": 0}, single)


def kd_terms_triton(logits: Tensor | Sequence[Tensor], teacher_logits: Tensor, targets: Tensor, *,
                    ce_weight: float | Sequence[float], kd_weight: float | Sequence[float], temperature: float,
                    kd: str = "kl", t_squared: bool = False, scale_student: bool = True,
                    label_smoothing: float = 0.0, convention: str = "wrong_classes",
                    ignore_index: int = -100) -> dict[str, Tensor]:
    single = isinstance(logits, Tensor)
    losses = multi_exit_loss([logits] if single else logits, targets, teacher="logits",
                             teacher_logits=teacher_logits, ce_weight=ce_weight, kd_weight=kd_weight,
                             temperature=temperature, kd=kd, t_squared=t_squared, scale_student=scale_student,
                             label_smoothing=label_smoothing, smoothing_convention=convention,
                             ignore_index=ignore_index)
    return _named(losses, {"ce": 0, "kd": 1}, single)


def soft_target_terms_triton(logits: Tensor | Sequence[Tensor], targets: Tensor, b: Tensor, *,
                             ce_weight: float | Sequence[float] = 0.0, soft_weight: float | Sequence[float] = 1.0,
                             kind: str = "soft_ce", temperature: float = 1.0, t_squared: bool = False,
                             ignore_index: int = -100) -> dict[str, Tensor]:
    single = isinstance(logits, Tensor)
    losses = multi_exit_loss([logits] if single else logits, targets, teacher="closed_form", soft_b=b,
                             ce_weight=ce_weight, kd_weight=soft_weight, temperature=temperature, kd=kind,
                             t_squared=t_squared, ignore_index=ignore_index)
    return _named(losses, {"ce": 0, "soft": 1}, single)
