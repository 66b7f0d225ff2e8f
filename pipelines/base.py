"""The loader interface every data backend implements (torch, dali, dali-cpu; synthetic data).

A loader yields `pipelines.batch.Batch`es already on the training device, normalised, in the requested memory
format. `set_epoch(epoch, start_batch)` fixes the epoch's order (and, for deterministic backends, its augmentation),
and lets a resumed run skip the batches it already trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, runtime_checkable

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
