"""Random batches created on the device: compute-only throughput, no input pipeline in the way.

With `partners`, each batch also carries a same-label partner batch in `Batch.extra['partner']`, as the class-pair
sampler would put it, and with `extra_view` a second view in `Batch.extra['view']`: CS-KD runs on synthetic data too.
"""
from __future__ import annotations

from typing import Iterator

import torch

from pipelines.batch import Batch


class SyntheticLoader:
    def __init__(self, num_samples: int, batch_size: int, num_classes: int, in_chans: int, image_size: int,
                 device: torch.device, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format, seed: int = 0,
                 partners: bool = False, extra_view: bool = False):
        self.num_samples, self.batch_size = num_samples, batch_size
        gen = torch.Generator(device=device).manual_seed(seed)

        def images() -> torch.Tensor:
            return torch.randn(batch_size, in_chans, image_size, image_size, device=device, dtype=dtype,
                               generator=gen).contiguous(memory_format=memory_format)

        # One fixed batch, reused: creating random tensors every step would itself cost bandwidth.
        self.images = images()
        self.labels = torch.randint(0, num_classes, (batch_size,), device=device, generator=gen)
        self.extra = {name: images() for name, wanted in (("partner", partners), ("view", extra_view)) if wanted}
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.start_batch, len(self)):
            yield Batch(self.images, self.labels, dict(self.extra))
