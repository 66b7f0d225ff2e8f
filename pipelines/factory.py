"""`build_data`: one entry point from the `data.*` options to train / val / test loaders of any backend.

The options come as one object with the fields of `data.*` (the engine passes its `DataConfig`); what the data layer
needs from elsewhere arrives as plain arguments, so it reads no other part of the run's config.
"""
from __future__ import annotations

import torch

from pipelines.base import DataBundle, LoaderSpec
from pipelines.batch import DataError
from pipelines.dali import build_dali_data
from pipelines.datasets import FASHION_MNIST_CLASSES, load_digits_split, load_fashion_mnist
from pipelines.folder_splits import carve, folder_splits, split_seed
from pipelines.samplers import ClassPairBatchSampler
from pipelines.synthetic import SyntheticLoader
from pipelines.torch_loader import FolderLoader, TensorLoader

_NOISE_SEED_OFFSET = 7919  # any fixed offset: the noise must not reuse the stream that shuffles or initialises


def _limit(n: int, limit: int) -> int:
    return min(n, limit) if limit else n


def _subset(labels: torch.Tensor, limit: int, balanced: bool, num_classes: int) -> torch.Tensor:
    """Indices of the training samples kept: the first `limit`, or with `balanced` the first limit/K of each class
    (in the carved order, so the subset follows the seed like the validation split does)."""
    if not limit or limit >= len(labels) and not balanced:
        return torch.arange(len(labels))
    if not balanced:
        return torch.arange(limit)
    per = limit // num_classes
    if per * num_classes != limit:
        raise DataError(f"data.limit_train={limit} is not a multiple of the {num_classes} classes "
                        "(data.balanced_subset=true)")
    idx = [torch.nonzero(labels == k).flatten()[:per] for k in range(num_classes)]
    if short := [k for k, i in enumerate(idx) if len(i) < per]:
        raise DataError(f"data.limit_train={limit}: class {short[0]} has fewer than {per} training samples")
    return torch.cat(idx).sort().values


def noisy_labels(labels: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: round(rate * N) samples, drawn without replacement, move to one of the K-1 other
    classes uniformly. Seeded apart from the model's initialisation, so every method of a seed sees the same labels."""
    g = torch.Generator().manual_seed(seed + _NOISE_SEED_OFFSET)
    n = round(rate * len(labels))
    idx = torch.randperm(len(labels), generator=g)[:n]
    out = labels.clone()
    out[idx] = (labels[idx] + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    return out


def _pair_sampler(d, labels, rank: int, world: int, seed: int, allow_self: bool):
    """CS-KD class-pair sampler for the training split (data.sampler=class_pair), else None."""
    if d.sampler != "class_pair":
        return None
    return ClassPairBatchSampler(labels, d.batch_size, rank, world, seed, allow_self=allow_self)


def build_data(d, device: torch.device, rank: int = 0, world: int = 1, *, seed: int, num_classes: int,
               in_chans: int, channels_last: bool = False, amp: str = "fp32",
               allow_self_partner: bool = True) -> DataBundle:
    """Loaders for the `data.*` options `d`, sharded for `rank` of `world`. `num_classes` and `in_chans` shape
    synthetic batches and image-folder images; `amp` sets DALI's output dtype; `allow_self_partner` lets the CS-KD
    class-pair sampler pick the anchor itself."""
    mf = torch.channels_last if channels_last else torch.contiguous_format
    if (d.balanced_subset or d.label_noise) and (d.dataset not in ("fashion_mnist", "digits") or d.backend != "torch"):
        raise DataError("data.balanced_subset and data.label_noise need data.dataset=fashion_mnist or digits "
                        "with data.backend=torch")
    if d.dataset == "synthetic":  # random batches on the device; partners and views too when asked for
        n = d.limit_train or 100 * d.batch_size
        train = SyntheticLoader(n, d.batch_size, num_classes, in_chans, d.image_size, device, memory_format=mf,
                                seed=seed, partners=d.sampler == "class_pair", extra_view=d.extra_view)
        val = SyntheticLoader(d.eval_batch_size, d.eval_batch_size, num_classes, in_chans, d.image_size, device,
                              memory_format=mf, seed=seed)
        return DataBundle(train, val, None, num_classes, in_chans, [str(i) for i in range(num_classes)])
    if d.backend in ("dali", "dali-cpu"):
        return build_dali_data(d, device, rank, world, seed=seed, in_chans=in_chans, channels_last=channels_last,
                               amp=amp, allow_self_partner=allow_self_partner)
    if d.dataset in ("fashion_mnist", "digits"):
        return _in_memory(d, device, rank, world, mf, seed, allow_self_partner)
    return _folder(d, device, rank, world, mf, seed, in_chans, allow_self_partner)


def _in_memory(d, device, rank, world, mf, seed, allow_self) -> DataBundle:
    if d.dataset == "fashion_mnist":
        splits, classes = load_fashion_mnist(d.root), FASHION_MNIST_CLASSES
    else:
        splits, classes = load_digits_split(), [str(i) for i in range(10)]
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    xval = yval = None
    if d.val_split:
        tr, va = carve(len(ytr), d.val_split, split_seed(d, seed))
        xval, yval, xtr, ytr = xtr[va], ytr[va], xtr[tr], ytr[tr]
    keep = _subset(ytr, d.limit_train, d.balanced_subset, len(classes))
    xtr, ytr = xtr[keep], ytr[keep]
    if d.label_noise:
        ytr = noisy_labels(ytr, d.label_noise, len(classes), split_seed(d, seed))
    ne = _limit(len(yte), d.limit_eval)
    xte, yte = xte[:ne], yte[:ne]
    mean = torch.tensor(d.mean) if d.mean else (xtr.float() / 255).mean(dim=(0, 2, 3))
    std = torch.tensor(d.std) if d.std else (xtr.float() / 255).std(dim=(0, 2, 3))

    def mk(x, y, train):
        pairs = _pair_sampler(d, y, rank, world, seed, allow_self) if train else None
        return TensorLoader(x, y, LoaderSpec.from_options(d, train, mean.tolist(), std.tolist(), mf, rank, world, seed,
                                                          pairs), device)

    val = mk(xval[: _limit(len(yval), d.limit_eval)], yval[: _limit(len(yval), d.limit_eval)], False) \
        if xval is not None else None
    return DataBundle(mk(xtr, ytr, True), val, mk(xte, yte, False), len(classes), xtr.shape[1], classes,
                      {"mean": mean.tolist(), "std": std.tolist()})


def _folder(d, device, rank, world, mf, seed, in_chans, allow_self) -> DataBundle:
    s = folder_splits(d, seed, in_chans)  # the same files and labels as the DALI backend reads
    def mk(samples, is_train):
        if samples is None:
            return None
        pairs = _pair_sampler(d, [y for _, y in samples], rank, world, seed, allow_self) if is_train else None
        return FolderLoader(samples, LoaderSpec.from_options(d, is_train, s.mean, s.std, mf, rank, world, seed, pairs),
                            device, in_chans, d.workers, d.skip_corrupt)

    return DataBundle(mk(s.train, True), mk(s.val, False), mk(s.test, False), len(s.classes), in_chans, s.classes,
                      {"mean": list(s.mean), "std": list(s.std)})
