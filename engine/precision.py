"""How the model runs: autocast for `precision.amp`, the fp16 loss scaler, and the order of DDP and
torch.compile around the training model."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from engine.distributed import DistInfo, wrap_ddp


def autocast(device: torch.device, amp: str, cache: bool = True):
    """`cache=False` drops autocast's weight-cast cache, which a CUDA-graph capture must not hold."""
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, cache_enabled=cache)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only: bf16 has fp32's exponent range."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def training_module(model: nn.Module, info: DistInfo, precision, find_unused: bool) -> nn.Module:
    """The module the step calls: DDP inside torch.compile. Dynamo then splits the graph at DDP's gradient buckets,
    so each bucket's all-reduce overlaps the rest of the backward; DDP around a compiled module would wait for the
    whole backward."""
    module = wrap_ddp(model, info, find_unused)
    if precision.compile:
        module = torch.compile(module, mode=precision.compile_mode, backend=precision.compile_backend)
    return module
