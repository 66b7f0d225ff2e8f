"""THE PyTorch reference of the fused multi-exit loss (kernels/multi_exit_loss.py), shared by tests and benchmarks.

It computes in `dtype` (float64 for tests, float32 for the benchmark's eager / torch.compile baselines) and is
differentiable w.r.t. the given tensors, so autograd through the casts hands back reference gradients rounded once
to the input dtype. CE is F.cross_entropy where PyTorch has the convention; other soft targets (wrong-classes
smoothing, the closed-form Beta teacher) are built explicitly as [B, C] tensors here (the kernel never builds them),
so the closed-form algebra of the kernel is checked against the plain definition. The hint is
engine/objectives/byot.py's hint_loss itself; CE and KD are written out here because they take options byot.py has
no use for (smoothing, a closed-form teacher, an unscaled student), and tests/test_kernels.py checks in float64 that
they equal byot_terms.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.objectives.byot import hint_loss
from kernels.multi_exit_loss import _as_list, ce_true_mass, resolve_weights


def soft_target(targets: Tensor, b: Tensor | float, num_classes: int, ignore_index: int = -100,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """[B, C]: b on the label, (1-b)/(C-1) elsewhere (rows with ignore_index point at class 0; callers mask them)."""
    B = targets.shape[0]
    b = torch.as_tensor(b, dtype=dtype, device=targets.device).expand(B)
    t = ((1 - b) / (num_classes - 1))[:, None].expand(B, num_classes).clone()
    y = torch.where(targets == ignore_index, 0, targets)
    return t.scatter(1, y[:, None], b[:, None])


def _masked_mean(rows: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, rows, 0).sum() / mask.sum()


def ce_rows(z: Tensor, target: Tensor) -> Tensor:
    return -(target * F.log_softmax(z, -1)).sum(-1)


def smoothed_ce(z: Tensor, targets: Tensor, eps: float, convention: str, ignore_index: int) -> Tensor:
    """Mean over labelled rows. PyTorch's own cross_entropy where it has the convention (hard labels, eps/K on
    every class); the wrong-classes convention (eps/(K-1) on each wrong class) through an explicit target."""
    if eps == 0.0 or convention == "all_classes":
        return F.cross_entropy(z, targets, ignore_index=ignore_index, label_smoothing=eps)
    target = soft_target(targets, ce_true_mass(eps, convention, z.shape[-1]), z.shape[-1], ignore_index, z.dtype)
    return _masked_mean(ce_rows(z, target), targets != ignore_index)


def kd_rows(z: Tensor, p: Tensor, student_scale: float, kind: str) -> Tensor:
    """KL(p || softmax(z / s)) or the soft cross-entropy -sum p log softmax(z / s), per row (xlogy: 0 log 0 = 0)."""
    log_q = F.log_softmax(z / student_scale, -1)
    cross = -(p * log_q).sum(-1)
    return cross + torch.xlogy(p, p).sum(-1) if kind == "kl" else cross


def multi_exit_loss_reference(logits: Sequence[Tensor] | Tensor, targets: Tensor, *,
                              features: Sequence[Tensor] | Tensor | None = None, teacher: str = "deepest",
                              teacher_logits: Optional[Tensor] = None, soft_b: Optional[Tensor] = None,
                              ce_weight: float | Sequence[float] = 1.0, kd_weight: float | Sequence[float] = 0.0,
                              hint_weight: float | Sequence[float] = 0.0, temperature: float = 1.0, kd: str = "kl",
                              t_squared: bool = False, scale_student: bool = True, label_smoothing: float = 0.0,
                              smoothing_convention: str = "wrong_classes", hint: str = "none",
                              ignore_index: int = -100, block_c: int = 0, recompute_grad: bool = False,
                              dtype: torch.dtype = torch.float64) -> Tensor:
    """Same arguments and result ([E, 3]: ce, kd, hint per exit, weighted) as kernels.multi_exit_loss, in `dtype`
    (block_c and recompute_grad only steer the kernel: accepted so one options dict drives both)."""
    zs = [z.to(dtype) for z in _as_list(logits)]
    fs = [f.to(dtype) for f in _as_list(features)] if hint != "none" else []
    E, C = len(zs), zs[0].shape[1]
    w = resolve_weights(E, teacher, hint, ce_weight, kd_weight, hint_weight)
    valid = targets != ignore_index
    ce_true_mass(label_smoothing, smoothing_convention, C)  # same argument checks as the kernel
    kd_mask, p = torch.ones_like(valid), None
    if teacher in ("deepest", "logits"):
        t = zs[-1] if teacher == "deepest" else teacher_logits.to(dtype)
        p = F.softmax(t.detach() / temperature, -1)
    elif teacher == "closed_form":
        p, kd_mask = soft_target(targets, soft_b.to(dtype), C, ignore_index, dtype), valid
    scale = temperature**2 if t_squared else 1.0
    zero = zs[0].new_zeros(())
    out = []
    for e, z in enumerate(zs):
        ce = zero
        if w[3 * e]:
            ce = w[3 * e] * smoothed_ce(z, targets, label_smoothing, smoothing_convention, ignore_index)
        kdv = zero
        if p is not None and w[3 * e + 1]:
            rows = kd_rows(z, p, temperature if scale_student else 1.0, kd)
            kdv = w[3 * e + 1] * scale * _masked_mean(rows, kd_mask)
        hv = w[3 * e + 2] * hint_loss(fs[e], fs[-1], hint) if fs and w[3 * e + 2] else zero
        out.append(torch.stack([ce, kdv, hv]))
    return torch.stack(out)
