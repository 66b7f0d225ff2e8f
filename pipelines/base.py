"""The loader interface every data backend implements (torch, dali, dali-cpu; synthetic data).

A loader yields `pipelines.batch.Batch`es already on the training device, normalised, in the requested memory
format. `set_epoch(epoch, start_batch)` fixes the epoch's order (and, for deterministic backends, its augmentation),
and lets a resumed run skip the batches it already trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, runtime_checkable

import torch

from pipelines.batch import Batch


@runtime_checkable
class Loader(Protocol):
    num_samples: int  # samples this rank sees per epoch (eval: exactly its shard, no padding)

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...  # batches per epoch on this rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


@dataclass
class DataBundle:
    train: Loader
    val: Optional[Loader]  # model selection split (carved from train, or the dataset's own val)
    test: Optional[Loader]
    num_classes: int
    in_chans: int
    class_names: list[str]
    # what the loaders apply, (x / 255 - mean) / std per channel; None for synthetic batches (already normal)
    normalisation: Optional[dict[str, list[float]]] = None


@dataclass(frozen=True)
class LoaderSpec:
    """What one split's loader delivers, whichever backend builds it: batches of `batch_size` (training batches
    shuffled and augmented with `augment`) at `image_size`, normalised as (x / 255 - mean) / std in `memory_format`,
    sharded for `rank` of `world` in the order `seed` fixes; for training, CS-KD partners (`pairs`, a class-pair
    sampler over the same labels) and a second view of each anchor (`extra_view`)."""

    batch_size: int
    train: bool
    augment: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    memory_format: torch.memory_format = torch.contiguous_format
    rank: int = 0
    world: int = 1
    seed: int = 0
    pairs: Optional[object] = None
    extra_view: bool = False

    @classmethod
    def from_options(cls, d, train: bool, mean, std, memory_format: torch.memory_format, rank: int, world: int,
                     seed: int, pairs=None) -> "LoaderSpec":
        """The `data.*` options `d` of one split (train or evaluation), with the normalisation the data chose."""
        return cls(d.batch_size if train else d.eval_batch_size, train, d.augment, d.image_size, tuple(mean),
                   tuple(std), memory_format, rank, world, seed, pairs if train else None, d.extra_view and train)

