"""The torch DataLoader path: in-memory tensor sets (Fashion-MNIST, digits) and ImageFolder trees decoded by PIL.

Sharding follows DistributedSampler for training (epoch-seeded permutation, padded by wrap-around so every rank
has the same number of steps) and strides without padding for evaluation, so each sample is seen exactly once.

CS-KD (`data.sampler=class_pair`): a `ClassPairBatchSampler` picks each batch's anchors (the same epoch
permutation as the random sampler) and one same-class partner per anchor; `Batch.images`/`labels` hold the
anchors and `Batch.extra["partner"]` the partners. `data.extra_view` adds `Batch.extra["view"]`, a second
augmentation of the anchors (CS-KD-E). Every group gets its own random augmentation, seeded by (seed, epoch,
batch, rank, group) so resumed runs see the same images; the anchors' augmentation is the one a plain run uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pipelines.base import LoaderSpec
from pipelines.batch import Batch, DataError
from pipelines.transforms import center_crop_box, normalize, random_crop_flip, random_resized_crop_box, seeded_generator

ANCHOR, PARTNER, VIEW = 0, 1, 2  # augmentation streams: group 0 keeps the plain loader's random stream


def aug_generator(device: torch.device, seed: int, epoch: int, batch: int, rank: int, group: int) -> torch.Generator:
    keys = (seed, epoch, batch, rank) if group == ANCHOR else (seed, epoch, batch, rank, group)
    return seeded_generator(device, *keys)


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

    def __init__(self, n: int, spec: LoaderSpec, device: torch.device):
        self.n, self.batch_size, self.train = n, spec.batch_size, spec.train
        self.rank, self.world, self.seed = spec.rank, spec.world, spec.seed
        self.drop_last = spec.train  # an evaluation sees every sample
        self.epoch, self.start_batch = 0, 0
        self.num_samples = len(shard_indices(n, spec.rank, spec.world, spec.train, spec.seed, 0))
        self.pairs = spec.pairs  # ClassPairBatchSampler (CS-KD), training only
        self.extra_view = spec.extra_view
        self.augment, self.image_size, self.device, self.memory_format = (spec.augment, spec.image_size, device,
                                                                          spec.memory_format)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.pairs is not None:  # the class-pair sampler owns the epoch's batches (ceil(N/B), as the official)
            return len(self.pairs)
        return len(batch_slices(self.num_samples, self.batch_size, self.drop_last))

    def _batches(self) -> list[Tensor]:
        """Index batches from `start_batch` on; with a class-pair sampler each is [anchors | partners]."""
        if self.pairs is not None:
            return [torch.tensor(b) for b in self.pairs.batches(self.epoch)][self.start_batch:]
        idx = shard_indices(self.n, self.rank, self.world, self.train, self.seed, self.epoch)
        return [idx[s] for s in batch_slices(len(idx), self.batch_size, self.drop_last)][self.start_batch:]

    def _streams(self) -> list[int]:
        return [ANCHOR] + [PARTNER] * (self.pairs is not None) + [VIEW] * bool(self.extra_view)

    def _groups(self, idx: Tensor) -> list[tuple[int, Tensor]]:
        """(augmentation stream, indices) per image group of one batch: anchors, partners, second views."""
        anchors = idx if self.pairs is None else idx[: len(idx) // 2]
        parts = {ANCHOR: anchors, PARTNER: idx[len(idx) // 2:], VIEW: anchors}
        return [(g, parts[g]) for g in self._streams()]


class TensorLoader(_ShardedLoader):
    """A dataset held on the device as uint8; batches are gathered and augmented there.

    `pairs` (a ClassPairBatchSampler over the same labels, training only) and `extra_view` add
    `Batch.extra["partner"]` / `Batch.extra["view"]` (see the module doc)."""

    def __init__(self, images: Tensor, labels: Tensor, spec: LoaderSpec, device: torch.device):
        super().__init__(len(labels), spec, device)
        self.images, self.labels = images.to(device), labels.to(device)

    def _prepare(self, idx: Tensor, b: int, group: int) -> Tensor:
        x = self.images[idx]
        if x.shape[-1] != self.image_size:
            x = torch.nn.functional.interpolate(x.float(), size=self.image_size, mode="bilinear",
                                                antialias=True).round().clamp(0, 255).to(torch.uint8)
        if self.train and self.augment != "none":
            x = random_crop_flip(x, 4, aug_generator(self.device, self.seed, self.epoch, b, self.rank, group))
        return normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def __iter__(self) -> Iterator[Batch]:
        for b, idx in enumerate(self._batches(), start=self.start_batch):
            groups = [(g, i.to(self.device, non_blocking=True)) for g, i in self._groups(idx)]
            x = self._prepare(groups[0][1], b, ANCHOR)
            extra = {("partner" if g == PARTNER else "view"): self._prepare(i, b, g) for g, i in groups[1:]}
            yield Batch(x, self.labels[groups[0][1]], extra)


@dataclass(frozen=True)
class Unreadable:
    """An image that failed to decode. Returned, not raised, so the main process raises one clear `DataError`
    (or skips it): a DataLoader worker would wrap the error in its own traceback."""
    path: str
    error: str


class FolderDataset(Dataset):
    """PIL decode + crop/resize to a fixed size; randomness seeded by (seed, epoch, index) for reproducibility."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, train: bool, augment: str, in_chans: int,
                 seed: int, skip_corrupt: bool):
        self.samples, self.image_size, self.train, self.augment = samples, image_size, train, augment
        self.mode = "L" if in_chans == 1 else "RGB"
        self.seed, self.skip_corrupt, self.epoch = seed, skip_corrupt, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int] | Unreadable:
        """`key` = index, or (index, augmentation stream) so a partner or second view that is the same file as an
        anchor still gets its own random crop."""
        i, group = key if isinstance(key, tuple) else (key, ANCHOR)
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
                img.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            return Unreadable(path, str(e))
        gen = seeded_generator(torch.device("cpu"), self.seed, self.epoch, i, *((group,) if group else ()))
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


def _collate(items: list) -> tuple[Tensor, Tensor, list[Unreadable]]:
    good = [it for it in items if not isinstance(it, Unreadable)]
    bad = [it for it in items if isinstance(it, Unreadable)]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


def _collate_groups(items: list, groups: int) -> tuple[list[Tensor], Tensor, list[Unreadable]]:
    """items = `groups` equal runs (anchors, partners, views); a position is dropped from every group when any
    of its images failed to decode, so partners stay aligned with their anchors."""
    n = len(items) // groups
    bad = [it for it in items if isinstance(it, Unreadable)]
    keep = [k for k in range(n) if not any(isinstance(items[g * n + k], Unreadable) for g in range(groups))]
    if not keep:
        return [torch.empty(0, dtype=torch.uint8)] * groups, torch.empty(0, dtype=torch.long), bad
    xs = [torch.stack([items[g * n + k][0] for k in keep]) for g in range(groups)]
    return xs, torch.tensor([items[k][1] for k in keep]), bad


class FolderLoader(_ShardedLoader):
    def __init__(self, samples: list[tuple[str, int]], spec: LoaderSpec, device: torch.device, in_chans: int,
                 workers: int, skip_corrupt: bool = False):
        super().__init__(len(samples), spec, device)
        self.dataset = FolderDataset(samples, spec.image_size, spec.train, spec.augment, in_chans, spec.seed,
                                     skip_corrupt)
        self.workers, self.skip_corrupt = workers, skip_corrupt
        self.skipped_files: set[str] = set()  # unreadable files skipped so far (data.skip_corrupt)

    def _device_batch(self, x: Tensor, b: int, group: int) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.train and self.augment == "crop_flip":
            x = random_crop_flip(x, 4, aug_generator(self.device, self.seed, self.epoch, b, self.rank, group))
        return normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.epoch = self.epoch
        streams = self._streams()
        grouped = len(streams) > 1
        if not grouped:
            batches, collate = [b.tolist() for b in self._batches()], _collate
        else:
            batches = [[(i, g) for g, idx in self._groups(b) for i in idx.tolist()] for b in self._batches()]
            collate = partial(_collate_groups, groups=len(streams))
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=collate,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for b, (x, y, bad) in enumerate(loader, start=self.start_batch):
            if bad and not self.skip_corrupt:
                raise DataError(f"cannot decode image {bad[0].path}: {bad[0].error} "
                                "(set data.skip_corrupt=true to skip such files)")
            self.skipped_files.update(u.path for u in bad)
            if len(y) == 0:
                continue
            if not grouped:
                yield Batch(self._device_batch(x, b, ANCHOR), y.to(self.device, non_blocking=True))
                continue
            extra = {("partner" if g == PARTNER else "view"): self._device_batch(xg, b, g)
                     for g, xg in zip(streams[1:], x[1:])}
            yield Batch(self._device_batch(x[0], b, ANCHOR), y.to(self.device, non_blocking=True), extra)
