"""The contracts between loader, model, objective and loop.

Every loader yields a `Batch`, every model returns `ExitOutputs`, every objective returns a `LossOutput`.
`Batch` belongs to the data layer (`pipelines.batch`, which imports nothing of the engine) and is re-exported here.
`ExitOutputs` is a NamedTuple (not a dataclass) so DDP, torch.compile and torch.export pass it through untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from pipelines.batch import Batch

__all__ = ["Batch", "ExitOutputs", "LossOutput"]


class ExitOutputs(NamedTuple):
    logits: list[Tensor]  # one [B, K] per exit, shallow -> deep; the last is the backbone's own head
    features: list[Tensor]  # one pooled [B, D_i] per exit, same order (inputs of each exit's FC)


@dataclass
class LossOutput:
    total: Tensor  # scalar, differentiable
    terms: dict[str, Tensor]  # named scalar terms (already weighted), detached-or-not, on device
