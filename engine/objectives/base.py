"""Objective protocol and registry.

An objective runs the forward passes its method needs (anchors, no-grad partners, an EMA or frozen teacher) and
hands explicit tensors to pure loss functions. It returns a `LossOutput` whose `total` is the sum of its named,
already-weighted `terms`, so the log, the tests and the Triton kernels all see the same names.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.registry import Registry
from engine.types import Batch, ExitOutputs, LossOutput

OBJECTIVES = Registry("objective")
register_objective = OBJECTIVES.register


class Objective(nn.Module):
    """Default: one forward of the anchors, then `loss(out, batch)`. Methods needing more override `forward`."""

    def forward(self, model: nn.Module, batch: Batch) -> tuple[LossOutput, ExitOutputs]:
        out = model(batch.images)
        return self.loss(out, batch), out

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step (EMA teachers update here)."""


def sum_terms(terms: dict[str, torch.Tensor]) -> LossOutput:
    total = torch.stack(list(terms.values())).sum()
    return LossOutput(total, terms)


def resolve_backend(name: str, device: torch.device) -> str:
    """auto = Triton on CUDA, PyTorch elsewhere."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def build_objective(cfg, num_exits: int, device: torch.device) -> Objective:
    import engine.objectives  # noqa: F401  (registers every method)

    if cfg.objective.name not in OBJECTIVES:
        from engine.config import ConfigError

        raise ConfigError(f"objective.name: {cfg.objective.name!r} is not allowed; allowed values: "
                          f"{', '.join(OBJECTIVES.names())}")
    return OBJECTIVES.get(cfg.objective.name)(cfg, num_exits=num_exits, device=device)
