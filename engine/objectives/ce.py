"""Plain cross-entropy on the deepest exit: the single-exit baseline (shallow exits, if any, get no loss)."""
from __future__ import annotations

import torch
from torch import Tensor

from engine.objectives.base import Objective, register_objective, summed
from engine.objectives.functional import ce
from engine.types import Batch, ExitOutputs, LossOutput
from kernels.multi_exit.options import LossOptions


@register_objective("ce")
class CrossEntropy(Objective):
    routed = "ce on the deepest exit"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        return LossOptions(teacher="none")

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.use_fused(self.fused_call(cfg, device, {"ce": (0, 0)}))

    def torch_terms(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed({"ce": ce(logits, labels)})

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        return LossOutput(*self.compute(out.logits[-1], batch.labels))
