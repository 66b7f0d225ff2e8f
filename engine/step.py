"""The training step, the one that `selfdistill train` runs and `selfdistill bench train` times.

The LR is a pure function of the step. The forward runs under autocast through the objective, the backward through
the GradScaler. The gradients are unscaled before their norm is taken and clipped. Then come the scaler's step and
update, the objective's `after_step` and the EMA. The loss terms and the gradient norm are added to the logging
window's device sums (`engine.monitor`): nothing here reads a device value on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from engine.ema import ModelEMA
from engine.monitor import Window
from engine.optim import lr_at, set_lr
from engine.precision import autocast
from engine.types import Batch, LossOutput


@dataclass(frozen=True)
class StepParts:
    """What the step changes: the bare model (its gradients, the EMA's source), the module it calls (DDP and/or
    compiled around the model), the objective, the optimizer, the loss scaler and the EMA."""

    model: nn.Module
    train_model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEMA]


@dataclass(frozen=True)
class StepSettings:
    """What the step reads from the config, fixed for the run."""

    device: torch.device
    amp: str  # precision.amp
    clip_grad_norm: float  # optim.clip_grad_norm; 0 = off
    lr: float  # optim.lr, the peak
    schedule: object  # the schedule.* section: with `lr` and steps_per_epoch, the LR at each step (optim.lr_at)
    steps_per_epoch: int

    @classmethod
    def from_config(cls, cfg, device: torch.device, steps_per_epoch: int) -> "StepSettings":
        return cls(device, cfg.precision.amp, cfg.optim.clip_grad_norm, cfg.optim.lr, cfg.schedule, steps_per_epoch)


def train_step(p: StepParts, s: StepSettings, batch: Batch, step: int, window: Window) -> tuple[LossOutput, Tensor]:
    """One optimizer step (`step` counts from 0); returns the loss and the total gradient norm, both on device."""
    set_lr(p.optimizer, lr_at(step, s.steps_per_epoch, s.lr, s.schedule))
    with autocast(s.device, s.amp):
        loss, _ = p.objective(p.train_model, batch)
    p.optimizer.zero_grad(set_to_none=True)
    p.scaler.scale(loss.total).backward()
    p.scaler.unscale_(p.optimizer)  # a no-op unless fp16: the norm and the clipping see the true gradients
    params = [q for q in p.model.parameters() if q.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([q.grad for q in params])
    if s.clip_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, s.clip_grad_norm, grad_norm)
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.objective.after_step(p.model, step)
    if p.ema is not None:
        p.ema.update(p.model, step)
    window.add(loss, grad_norm)
    return loss, grad_norm
