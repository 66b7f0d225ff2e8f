"""The data layer's own types: the `Batch` every loader yields, and the errors it raises."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


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


class DataError(RuntimeError):
    """Bad input data: names the file or folder at fault."""


class DataConfigError(ValueError):
    """`data.*` options that cannot work together or on this machine: names the keys. The command line reports it
    as a config error."""
