"""The torch DataLoader path: in-memory tensor sets (Fashion-MNIST, digits) and ImageFolder trees decoded by PIL.

Sharding follows DistributedSampler for training (epoch-seeded permutation, padded by wrap-around so every rank
has the same number of steps) and strides without padding for evaluation, so each sample is seen exactly once.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from engine.types import Batch
from pipelines.base import DataError
from pipelines.transforms import (center_crop_box, normalize, random_crop_flip, random_resized_crop_box,
                                  seeded_generator)


def shard_indices(n: int, rank: int, world: int, train: bool, seed: int, epoch: int) -> Tensor:
    if not train:
        return torch.arange(rank, n, world)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    total = math.ceil(n / world) * world
    perm = torch.cat([perm, perm[: total - n]]) if total > n else perm
    return perm[rank:total:world]


def batch_slices(count: int, batch_size: int, drop_last: bool) -> list[slice]:
    stop = (count // batch_size) * batch_size if drop_last and count >= batch_size else count
    return [slice(i, min(i + batch_size, stop)) for i in range(0, stop, batch_size)]


class _ShardedLoader:
    """Common epoch/shard/resume bookkeeping."""

    def __init__(self, n: int, batch_size: int, train: bool, rank: int, world: int, seed: int, drop_last: bool):
        self.n, self.batch_size, self.train = n, batch_size, train
        self.rank, self.world, self.seed = rank, world, seed
        self.drop_last = drop_last and train
        self.epoch, self.start_batch = 0, 0
        self.num_samples = len(shard_indices(n, rank, world, train, seed, 0))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(batch_slices(self.num_samples, self.batch_size, self.drop_last))

    def _batches(self) -> list[Tensor]:
        idx = shard_indices(self.n, self.rank, self.world, self.train, self.seed, self.epoch)
        return [idx[s] for s in batch_slices(len(idx), self.batch_size, self.drop_last)][self.start_batch:]


class TensorLoader(_ShardedLoader):
    """A dataset held on the device as uint8; batches are gathered and augmented there."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, train: bool, augment: str, image_size: int,
                 mean: Tensor, std: Tensor, device: torch.device, rank: int = 0, world: int = 1, seed: int = 0,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__(len(labels), batch_size, train, rank, world, seed, drop_last=True)
        self.images, self.labels = images.to(device), labels.to(device)
        self.augment, self.image_size, self.device = augment, image_size, device
        self.mean, self.std = mean.to(device), std.to(device)
        self.memory_format = memory_format

    def __iter__(self) -> Iterator[Batch]:
        for b, idx in enumerate(self._batches(), start=self.start_batch):
            idx = idx.to(self.device, non_blocking=True)
            x = self.images[idx]
            if x.shape[-1] != self.image_size:
                x = torch.nn.functional.interpolate(x.float(), size=self.image_size, mode="bilinear",
                                                    antialias=True).round().clamp(0, 255).to(torch.uint8)
            if self.train and self.augment != "none":
                x = random_crop_flip(x, 4, seeded_generator(self.device, self.seed, self.epoch, b, self.rank))
            x = normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)
            yield Batch(x, self.labels[idx])


class FolderDataset(Dataset):
    """PIL decode + crop/resize to a fixed size; randomness seeded by (seed, epoch, index) for reproducibility."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, train: bool, augment: str, in_chans: int,
                 seed: int, skip_corrupt: bool):
        self.samples, self.image_size, self.train, self.augment = samples, image_size, train, augment
        self.mode = "L" if in_chans == 1 else "RGB"
        self.seed, self.skip_corrupt, self.epoch = seed, skip_corrupt, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
                img.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            if self.skip_corrupt:
                return None
            raise DataError(f"cannot decode image {path}: {e} (set data.skip_corrupt=true to skip such files)") from None
        gen = seeded_generator(torch.device("cpu"), self.seed, self.epoch, i)
        s = self.image_size
        if self.augment == "random_resized_crop":
            box = random_resized_crop_box(*img.size, gen) if self.train else center_crop_box(*img.size)
        else:  # 32-px recipe: whole image; crop+flip happen on the device batch
            box = (0, 0, *img.size)
        img = img.resize((s, s), Image.BILINEAR, box=box)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, -1).permute(2, 0, 1)
        if self.train and self.augment == "random_resized_crop" and bool(torch.rand(1, generator=gen) < 0.5):
            x = x.flip(-1)
        return x.contiguous(), label


def _collate(items: list) -> tuple[Tensor, Tensor, int]:
    good = [it for it in items if it is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), len(items)
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), len(items) - len(good)


class FolderLoader(_ShardedLoader):
    def __init__(self, samples: list[tuple[str, int]], batch_size: int, train: bool, augment: str, image_size: int,
                 in_chans: int, mean: Tensor, std: Tensor, device: torch.device, workers: int, rank: int = 0,
                 world: int = 1, seed: int = 0, skip_corrupt: bool = False,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__(len(samples), batch_size, train, rank, world, seed, drop_last=True)
        self.dataset = FolderDataset(samples, image_size, train, augment, in_chans, seed, skip_corrupt)
        self.augment, self.workers, self.device = augment, workers, device
        self.mean, self.std, self.memory_format = mean.to(device), std.to(device), memory_format
        self.skipped = 0  # corrupt files skipped so far (data.skip_corrupt)

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.epoch = self.epoch
        batches = [b.tolist() for b in self._batches()]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for b, (x, y, skipped) in enumerate(loader, start=self.start_batch):
            self.skipped += skipped
            if len(y) == 0:
                continue
            x = x.to(self.device, non_blocking=True)
            if self.train and self.augment == "crop_flip":
                x = random_crop_flip(x, 4, seeded_generator(self.device, self.seed, self.epoch, b, self.rank))
            x = normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)
            yield Batch(x, y.to(self.device, non_blocking=True))
