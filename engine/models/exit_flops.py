"""FLOPs and parameters of every exit of a `MultiExitModel`: the price of stopping there, and of the ensembles.

Exit k costs the stem, the stages up to its own and its own head (`TruncatedModel(model, k)`, what early exiting at
k runs); either ensemble costs the whole model with every head. Counted by `torch.utils.flop_counter`
(2 FLOPs per multiply-add, convolutions and matmuls), forward only, batch 1, in eval mode.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.models.early_exit import TruncatedModel


def count_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs of everything `fn(*args)` runs, a backward it calls included: 2 per multiply-add, matmuls and
    convolutions."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    """Distinct parameters: `parameters()` yields a tensor shared under two names (an alias) once."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def exit_costs(model: nn.Module, x: torch.Tensor) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one record per exit, shallow -> deep; the training forward with every exit) for one image `x` [1, C, H, W].

    Per exit: its parameters and FLOPs deployed alone (`TruncatedModel`), its head's share, and the path FLOPs of
    an early exit there: the backbone up to it and every head up to it, what `EarlyExitModel` has run when a sample
    leaves at k. Ratios are against the full model, the deepest exit alone."""
    n, n_stages = model.num_exits, len(model.backbone.feature_info)
    _, inters = model.backbone.forward_intermediates(x, indices=model.exit_stages)
    exits, heads_so_far = [], 0
    for k in range(n):
        trunc = TruncatedModel(model, k).eval()
        shallow = k < n - 1
        flops, head_flops = count_flops(trunc, x), count_flops(model.heads[k], inters[k]) if shallow else 0
        heads_so_far += head_flops
        stage = int(model.exit_info[k]["stage"])
        exits.append({"exit": k, "stage": stage, "depth": f"{stage + 1}/{n_stages}", "params": count_params(trunc),
                      "head_params": count_params(model.heads[k]) if shallow else 0, "flops_per_image": flops,
                      "early_exit_path_flops_per_image": flops - head_flops + heads_so_far,
                      "head_flops_per_image": head_flops, "backbone_flops_per_image": flops - head_flops})
    full, all_flops = exits[-1], count_flops(model, x)
    for e in exits:
        e["flop_ratio_vs_full"] = round(full["flops_per_image"] / e["flops_per_image"], 4)
        e["backbone_flop_ratio_vs_full"] = round(full["backbone_flops_per_image"] / e["backbone_flops_per_image"], 4)
    return exits, {"params": count_params(model), "flops_per_image": all_flops,
                   "extra_flops_over_full_pct": round((all_flops / full["flops_per_image"] - 1) * 100, 3)}


def exit_gflops(model: nn.Module, in_chans: int, image_size: int) -> dict[str, float]:
    """{"exit0": .., ..., "all_exits": ..} in GFLOPs per image. Puts `model` in eval mode."""
    model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size)
    with torch.no_grad():
        out = {f"exit{k}": count_flops(TruncatedModel(model, k), x) / 1e9 for k in range(model.num_exits)}
        out["all_exits"] = count_flops(model, x) / 1e9
    return out
