"""Deep supervision (Lee et al. 2015): plain CE at every exit with weight 1, no distillation. The baseline that
BYOT must beat to show that its KD and hint terms, not the extra exits alone, help."""
from __future__ import annotations

import torch
from torch import Tensor

from engine.objectives.base import Objective, register_objective, summed
from engine.objectives.functional import ce
from engine.types import Batch, ExitOutputs, LossOutput
from kernels.multi_exit.options import LossOptions


def dsn_terms(logits: list[Tensor], labels: Tensor) -> dict[str, Tensor]:
    return {f"ce_{i}": ce(z, labels) for i, z in enumerate(logits)}


@register_objective("dsn")
class DeepSupervision(Objective):
    routed = "ce_i at every exit, one launch"

    @classmethod
    def kernel_options(cls, cfg, num_exits: int) -> LossOptions:
        return LossOptions(teacher="none")

    def __init__(self, cfg, num_exits: int, device: torch.device):
        super().__init__()
        self.use_fused(self.fused_call(cfg, device, {f"ce_{i}": (i, 0) for i in range(num_exits)}, num_exits))

    def torch_terms(self, logits: list[Tensor], labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return summed(dsn_terms(logits, labels))

    def loss(self, out: ExitOutputs, batch: Batch) -> LossOutput:
        return LossOutput(*self.compute(out.logits, batch.labels))
