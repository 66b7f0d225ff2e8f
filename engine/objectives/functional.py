"""The loss functions the objectives share: pure functions of tensors, the PyTorch reference of the fused kernel.

Every loss accumulates in at least fp32 (`upcast`) and is a mean over rows unless its name says otherwise; a
teacher or target tensor is treated as a constant (detached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_EPS = 1e-8  # the Beta-smoothing code takes log(softmax + 1e-8) in every soft-target loss


def upcast(t: Tensor) -> Tensor:
    """fp16/bf16 to fp32; fp32 and fp64 unchanged, so float64 references compare exactly."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with hard labels (label -100 ignored)."""
    return F.cross_entropy(upcast(logits), labels)


def soft_target_ce(logits: Tensor, target: Tensor, log_eps: float = LOG_EPS) -> Tensor:
    """-(1/N) sum_i sum_k t_ik log p_ik with p = softmax(logits); `log_eps` > 0 = the official code's
    log(p + eps), 0 = exact log_softmax."""
    z = upcast(logits)
    log_p = torch.log(F.softmax(z, -1) + log_eps) if log_eps > 0 else F.log_softmax(z, -1)
    return -(target.detach().to(log_p.dtype) * log_p).sum(-1).mean()


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, kind: str = "kl", t_squared: bool = True) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) ("kl") or the soft cross-entropy ("soft_ce"), times T² if `t_squared`."""
    log_q = F.log_softmax(upcast(student) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher.detach()) / temperature, dim=-1)
    p = log_p.exp()
    per_row = (p * (log_p - log_q)).sum(-1) if kind == "kl" else -(p * log_q).sum(-1)
    loss = per_row.mean()
    return loss * temperature**2 if t_squared else loss


def hint_loss(feat: Tensor, target: Tensor, kind: str = "sse") -> Tensor:
    """Feature distance to the (detached) target feature, over the whole batch:
    "sse"  sum of (f - t)^2 where (f > 0) | (t > 0)   (luanyunteng)
    "l2"   torch.dist(f, t), one un-squared L2 norm   (journal code)
    "mse"  mean squared error"""
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
