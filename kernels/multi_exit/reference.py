"""THE PyTorch reference of the fused multi-exit loss, shared by the tests and the benchmarks.

It takes the same keyword options as kernels.multi_exit.options.LossOptions (`**opts.as_kwargs()`) and computes every
term from its plain definition in `dtype` (float64 for tests, float32 for the benchmarks' eager and torch.compile
baselines), differentiably, so autograd through the casts gives reference gradients rounded once to the input
dtype. It is independent of the code it checks: it imports nothing from kernels/, builds every soft target as an
explicit [B, C] distribution (PyTorch's own `label_smoothing` where PyTorch has the convention), resolves the
per-exit weights itself and writes the hints out.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _exits(x) -> list[Tensor]:
    if x is None:
        return []
    return list(x.unbind(0)) if isinstance(x, Tensor) else list(x)


def _weights(w, n: int, deepest_teaches: bool) -> list[float]:
    """One weight per exit; a scalar reaches every exit that has the term, and the deepest exit gets none of a term
    it teaches itself."""
    if isinstance(w, (int, float)):
        values = [float(w)] * n
        if deepest_teaches:
            values[-1] = 0.0
        return values
    values = [float(v) for v in w]
    if deepest_teaches and len(values) == n - 1:
        values.append(0.0)
    if len(values) != n or (deepest_teaches and values[-1] != 0.0):
        raise ValueError(f"weights {w} do not fit {n} exits")
    return values


def smoothed_target(targets: Tensor, num_classes: int, eps: float, convention: str, dtype) -> Tensor:
    """[B, C] label-smoothing target; ignored rows point at class 0 (callers mask them)."""
    y = targets.clamp_min(0)
    onehot = F.one_hot(y, num_classes).to(dtype)
    if convention == "all_classes":
        return onehot * (1 - eps) + eps / num_classes
    return onehot * (1 - eps) + (1 - onehot) * (eps / (num_classes - 1))


def closed_form_target(targets: Tensor, b: Tensor, num_classes: int) -> Tensor:
    """[B, C]: b_i on the label, (1 - b_i) / (C - 1) on every other class."""
    onehot = F.one_hot(targets.clamp_min(0), num_classes).to(b.dtype)
    return onehot * b[:, None] + (1 - onehot) * ((1 - b) / (num_classes - 1))[:, None]


def soft_ce_rows(log_q: Tensor, target: Tensor) -> Tensor:
    return -(target * log_q).sum(-1)


def log_probs(z: Tensor, scale: float, log_eps: float) -> Tensor:
    """log softmax(z / scale), or the Beta-smoothing code's log(softmax + eps)."""
    if log_eps > 0:
        return torch.log(F.softmax(z / scale, -1) + log_eps)
    return F.log_softmax(z / scale, -1)


def hint_loss(feat: Tensor, target: Tensor, kind: str) -> Tensor:
    target = target.detach()
    if kind == "sse":  # BYOT: squared error where either activation is positive, summed over batch and dims
        on = (feat > 0) | (target > 0)
        return torch.where(on, (feat - target) ** 2, torch.zeros_like(feat)).sum()
    if kind == "l2":  # torch.dist: one un-squared norm over the whole batch
        return ((feat - target) ** 2).sum().sqrt()
    return ((feat - target) ** 2).mean()


def _masked_mean(rows: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, rows, torch.zeros_like(rows)).sum() / mask.sum()


def multi_exit_loss_reference(logits: Sequence[Tensor] | Tensor, targets: Tensor, *,
                              features: Sequence[Tensor] | Tensor | None = None,
                              teacher_logits: Optional[Tensor] = None, soft_b: Optional[Tensor] = None,
                              teacher: str = "deepest", ce_weight=1.0, kd_weight=0.0, hint_weight=0.0,
                              temperature: float = 1.0, kd: str = "kl", t_squared: bool = False,
                              scale_student: bool = True, label_smoothing: float = 0.0,
                              smoothing_convention: str = "wrong_classes", hint: str = "none",
                              log_eps: float = 0.0, ignore_index: int = -100, block_c: int = 0,
                              dtype: torch.dtype = torch.float64) -> Tensor:
    """[E, 3] (ce, kd, hint per exit, weighted) in `dtype`; `block_c` only steers the kernel."""
    zs = [z.to(dtype) for z in _exits(logits)]
    fs = [f.to(dtype) for f in _exits(features)] if hint != "none" else []
    E, C = len(zs), zs[0].shape[1]
    w_ce = _weights(ce_weight, E, False)
    w_kd = _weights(kd_weight, E, teacher == "deepest") if teacher != "none" else [0.0] * E
    w_h = _weights(hint_weight, E, True) if hint != "none" else [0.0] * E
    labelled = targets != ignore_index
    student_t = temperature if scale_student else 1.0
    factor = temperature ** 2 if t_squared else 1.0
    zero = zs[0].new_zeros(())

    eps_kd = log_eps if kd == "soft_ce" and teacher != "none" else 0.0  # the one soft-target term it goes to
    eps_ce = log_eps - eps_kd

    def ce(z: Tensor) -> Tensor:
        if eps_ce == 0 and (label_smoothing == 0 or smoothing_convention == "all_classes"):
            return F.cross_entropy(z, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
        target = smoothed_target(targets, C, label_smoothing, smoothing_convention, dtype)
        return _masked_mean(soft_ce_rows(log_probs(z, 1.0, eps_ce), target), labelled)

    p, kd_rows_mask = None, torch.ones_like(labelled)
    if teacher in ("deepest", "logits"):
        t = zs[-1] if teacher == "deepest" else teacher_logits.to(dtype)
        p = F.softmax(t.detach() / temperature, -1)
    elif teacher == "closed_form":
        p, kd_rows_mask = closed_form_target(targets, soft_b.to(dtype), C), labelled

    def distill(z: Tensor) -> Tensor:
        log_q = log_probs(z, student_t, eps_kd)
        rows = soft_ce_rows(log_q, p)
        if kd == "kl":
            rows = rows + torch.xlogy(p, p).sum(-1)
        return factor * _masked_mean(rows, kd_rows_mask)

    out = []
    for e, z in enumerate(zs):
        terms = [w_ce[e] * ce(z) if w_ce[e] else zero,
                 w_kd[e] * distill(z) if p is not None and w_kd[e] else zero,
                 w_h[e] * hint_loss(fs[e], fs[-1], hint) if fs and w_h[e] else zero]
        out.append(torch.stack(terms))
    return torch.stack(out)
