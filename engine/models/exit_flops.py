"""FLOPs per image of every exit of a `MultiExitModel`: the price of stopping there, and of the ensembles.

Exit k costs the stem, the stages up to its own and its own head (`TruncatedModel(model, k)`, what early exiting at
k runs); either ensemble costs the whole model with every head. Counted by `torch.utils.flop_counter`
(2 FLOPs per multiply-add, convolutions and matmuls), forward only, batch 1, in eval mode.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.models.early_exit import TruncatedModel


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def exit_gflops(model: nn.Module, in_chans: int, image_size: int) -> dict[str, float]:
    """{"exit0": .., ..., "all_exits": ..} in GFLOPs per image. Puts `model` in eval mode."""
    model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size)
    out = {f"exit{k}": _flops(TruncatedModel(model, k), x) / 1e9 for k in range(model.num_exits)}
    out["all_exits"] = _flops(model, x) / 1e9
    return out
