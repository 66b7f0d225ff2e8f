"""Optimizers (fused / foreach where available) and LR schedules as pure functions of the step."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool) -> list[dict]:
    if not no_decay_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # 1-D parameters are BN/LN scales and shifts and biases: the usual no-decay set (timm, DLE)
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _impl_kwargs(impl: str, device: torch.device) -> dict:
    if impl == "fused" or (impl == "auto" and device.type == "cuda"):
        return {"fused": True}
    if impl == "foreach" or impl == "auto":
        return {"foreach": True}
    return {"foreach": False}


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.no_decay_bn_bias)
    kw = _impl_kwargs(o.impl, device)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, **kw)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), **kw)


def lr_at(step: int, steps_per_epoch: int, base_lr: float, sched) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up, then multistep / cosine / constant."""
    epoch = step / steps_per_epoch
    if sched.warmup_epochs > 0 and epoch < sched.warmup_epochs:
        return base_lr * (step + 1) / (sched.warmup_epochs * steps_per_epoch)
    if sched.name == "multistep":
        return base_lr * sched.gamma ** sum(epoch >= m for m in sched.milestones)
    if sched.name == "cosine":
        total = sched.epochs - sched.warmup_epochs
        t = min(1.0, (epoch - sched.warmup_epochs) / max(total, 1e-8))
        return sched.min_lr + 0.5 * (base_lr - sched.min_lr) * (1 + math.cos(math.pi * t))
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
