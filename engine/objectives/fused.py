"""The objectives' fused-kernel backend (objective.backend = triton, or auto on CUDA): one generic call.

Each objective declares its own kernel options (`Objective.kernel_options`, a kernels.multi_exit.options.LossOptions)
and the names of its logged terms; `FusedCall` runs them. A call gives the differentiable total of the weighted terms
and the terms themselves: the objective backpropagates through the total (one sum, no per-term selects in the graph)
and logs the terms detached. Importing this module loads triton (an optional dependency): the objectives import it
when objective.backend resolves to triton, and only then.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from kernels.multi_exit.op import fused_loss
from kernels.multi_exit.options import LossOptions


class FusedCall:
    """One fused call of an objective, its options and term names fixed at construction. A call returns
    (differentiable total, {name: detached term}); `names` maps each logged term to its (exit, column) in the
    [E, 3] losses (column 0 ce, 1 kd, 2 hint). A single [B, C] tensor is one exit."""

    def __init__(self, opts: LossOptions, names: dict[str, tuple[int, int]]):
        self.opts, self.names = opts, names
        self.flat = [(name, 3 * e + k) for name, (e, k) in names.items()]

    def __call__(self, logits: Tensor | list[Tensor], targets: Tensor, features: Optional[list[Tensor]] = None,
                 teacher_logits: Optional[Tensor] = None,
                 soft_b: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        zs = [logits] if isinstance(logits, Tensor) else logits
        total, losses = fused_loss(zs, targets, self.opts, features=features, teacher_logits=teacher_logits,
                                   soft_b=soft_b)
        values = losses.detach().view(-1).unbind(0)  # one call for every term's view
        return total, {name: values[i] for name, i in self.flat}
