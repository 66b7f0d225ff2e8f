"""The contracts between loader, model, objective and loop.

Every loader yields a `Batch`, every model returns `ExitOutputs`, every objective returns a `LossOutput`.
`ExitOutputs` is a NamedTuple (not a dataclass) so DDP, torch.compile and torch.export pass it through untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor


class ExitOutputs(NamedTuple):
    logits: list[Tensor]  # one [B, K] per exit, shallow -> deep; the last is the backbone's own head
    features: list[Tensor]  # one pooled [B, D_i] per exit, same order (inputs of each exit's FC)


@dataclass
class LossOutput:
    total: Tensor  # scalar, differentiable
    terms: dict[str, Tensor]  # named scalar terms (already weighted), detached-or-not, on device


@dataclass
class Batch:
    images: Tensor  # [N, C, H, W], float (normalised) on the training device, possibly channels_last
    labels: Tensor  # [N] int64
    # CS-KD partners (same class as each anchor) and extra augmented views travel here, never as a second loader.
    extra: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, memory_format: torch.memory_format | None = None) -> "Batch":
        def move(t: Tensor) -> Tensor:
            t = t.to(device, non_blocking=True)
            if memory_format is not None and t.dim() == 4:
                t = t.contiguous(memory_format=memory_format)
            return t

        return replace(self, images=move(self.images), labels=self.labels.to(device, non_blocking=True),
                       extra={k: move(v) for k, v in self.extra.items()})

    def __len__(self) -> int:
        return self.labels.shape[0]
