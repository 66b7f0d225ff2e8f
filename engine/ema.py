"""Exponential moving average of a model, updated on device with foreach ops (no host sync)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """`decay_fn(step)` gives the decay; `buffers=True` also averages BN statistics (timm) rather than copying."""

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
