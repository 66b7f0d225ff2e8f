"""CS-KD class-pair batches, shared by the torch and DALI loaders.

Each batch is B anchor indices followed by B partner indices; partner k has the class of anchor k (Yun et al.,
CVPR 2020, `alinlab/cs-kd` `PairBatchSampler`). As there, an epoch is one shuffle of the anchors cut into
ceil(N/B) batches, the last one short, so every index is an anchor exactly once (`drop_last=True` is available but
the loaders do not use it). Differences from the official sampler, on purpose:
- epoch-seeded and deterministic (the official one uses the global `random` state), so a resumed run and every
  rank agree on the epoch's batches;
- distributed: anchors are sharded like the torch training path (`shard_indices`: one epoch permutation, padded
  by wrap-around so every rank has the same number of steps; when N % world != 0 up to world-1 anchors appear
  twice per epoch, exactly as with `DistributedSampler`);
- `allow_self=False` never pairs an anchor with itself, except in a class of one image, where nothing else exists.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from pipelines.torch_loader import batch_slices, shard_indices
from pipelines.transforms import seeded_generator

# Keeps the partner draws off the random stream of the anchor permutation (which uses (seed, epoch) directly).
_PARTNER_STREAM = 7919


class ClassPairBatchSampler:
    def __init__(self, labels: Sequence[int] | np.ndarray | Tensor, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, allow_self: bool = True, drop_last: bool = False):
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long).flatten()
        if len(y) == 0:
            raise ValueError("ClassPairBatchSampler: no labels")
        if batch_size < 1:
            raise ValueError(f"ClassPairBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"ClassPairBatchSampler: rank {rank} is not in 0..{world - 1}")
        if int(y.min()) < 0:
            raise ValueError(f"ClassPairBatchSampler: negative label {int(y.min())}")
        self.labels, self.batch_size = y, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.allow_self, self.drop_last = allow_self, drop_last
        self.epoch = 0
        # Members of each class laid out contiguously: class c owns by_class[start[c] : start[c] + count[c]].
        self.by_class = torch.argsort(y, stable=True)
        self.count = torch.bincount(y)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.rank_in_class = torch.empty_like(y)
        self.rank_in_class[self.by_class] = torch.arange(len(y)) - self.start[y[self.by_class]]
        self.num_anchors = len(shard_indices(len(y), rank, world, True, seed, 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(batch_slices(self.num_anchors, self.batch_size, self.drop_last))

    def partners(self, anchors: Tensor, epoch: int) -> Tensor:
        """One same-class partner per anchor, uniform over the class (minus the anchor if allow_self=False)."""
        gen = seeded_generator(torch.device("cpu"), self.seed, epoch, self.rank, _PARTNER_STREAM)
        u = torch.rand(len(anchors), generator=gen, dtype=torch.float64)
        y = self.labels[anchors]
        count = self.count[y]
        if self.allow_self:
            k = (u * count).long().clamp_max(count - 1)
        else:
            others = (count - 1).clamp_min(1)  # a class of one can only pair with itself
            k = (u * others).long().clamp_max(others - 1)
            k = k + ((k >= self.rank_in_class[anchors]) & (count > 1)).long()  # skip over the anchor's own slot
        return self.by_class[self.start[y] + k]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All of this rank's batches for `epoch` (default: the one set by set_epoch): anchors then partners."""
        epoch = self.epoch if epoch is None else epoch
        anchors = shard_indices(len(self.labels), self.rank, self.world, True, self.seed, epoch)
        partners = self.partners(anchors, epoch)
        return [anchors[s].tolist() + partners[s].tolist()
                for s in batch_slices(len(anchors), self.batch_size, self.drop_last)]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()
