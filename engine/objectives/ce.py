"""Plain cross-entropy on the deepest exit: the single-exit baseline (shallow exits, if any, get no loss)."""
from __future__ import annotations

import torch
from torch import Tensor

from engine.objectives.base import Objective, fused_call, register_objective, summed
from engine.objectives.functional import ce
from engine.types import Batch, ExitOutputs, LossOutput


@register_objective("ce")
class CrossEntropy(Objective):
    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.use_fused(fused_call(cfg, device, {"ce": (0, 0)}))

    def torch_terms(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed({"ce": ce(logits, labels)})

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        return LossOutput(*self.compute(out.logits[-1], batch.labels))
