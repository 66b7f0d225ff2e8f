"""The training step, the one that `selfdistill train` runs and `selfdistill bench train` times.

The LR is a pure function of the step. The forward runs under autocast through the objective, the backward through
the GradScaler. The gradients are unscaled before their norm is taken and clipped. Then come the scaler's step and
update, the objective's `after_step` and the EMA. The loss terms and the gradient norm are added to the logging
window's device sums (`engine.monitor`): nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from engine.config import Config
from engine.evaluate import autocast
from engine.monitor import Window
from engine.optim import lr_at, set_lr
from engine.setup_run import Components
from engine.types import Batch, LossOutput


def train_step(cfg: Config, c: Components, batch: Batch, step: int, steps_per_epoch: int,
               window: Window) -> tuple[LossOutput, Tensor]:
    """One optimizer step (`step` counts from 0); returns the loss and the total gradient norm, both on device."""
    set_lr(c.optimizer, lr_at(step, steps_per_epoch, cfg.optim.lr, cfg.schedule))
    with autocast(c.info.device, cfg.precision.amp):
        loss, _ = c.objective(c.train_model, batch)
    c.optimizer.zero_grad(set_to_none=True)
    c.scaler.scale(loss.total).backward()
    c.scaler.unscale_(c.optimizer)  # a no-op unless fp16: the norm and the clipping see the true gradients
    params = [p for p in c.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if cfg.optim.clip_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_grad_norm, grad_norm)
    c.scaler.step(c.optimizer)
    c.scaler.update()
    c.objective.after_step(c.model, step)
    if c.ema is not None:
        c.ema.update(c.model, step)
    window.add(loss, grad_norm)
    return loss, grad_norm
