"""Exponential moving average of a model, updated on the device (no host sync)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """A frozen copy of a model whose weights follow it: after each step, w_ema <- d * w_ema + (1 - d) * w.

    d is `decay`; with `warmup` it is min(1 - 1/(step + 1), decay), so the first steps follow the model closely
    (Zhang & Sabuncu's mean teacher). Floating-point buffers (BN statistics) are averaged the same way and integer
    ones copied; `params_only` leaves the copy's buffers as they are."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False, params_only: bool = False):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay, self.warmup, self.params_only = decay, warmup, params_only

    def decay_at(self, step: int) -> float:
        # Zhang & Sabuncu's mean teacher: min(1 - 1/(step+1), decay), so early steps follow the model closely.
        return min(1.0 - 1.0 / (step + 1), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        if not self.params_only:
            for e, s in zip(self.module.buffers(), model.buffers()):
                if e.dtype.is_floating_point:
                    e.lerp_(s, 1.0 - d)
                else:
                    e.copy_(s)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
