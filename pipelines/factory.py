"""`build_data(cfg, ...)`: one entry point from `data.*` config to train / val / test loaders of any backend."""
from __future__ import annotations

import torch

from pipelines.base import DataBundle
from pipelines.datasets import FASHION_MNIST_CLASSES, load_digits_split, load_fashion_mnist
from pipelines.folder_splits import carve, folder_splits
from pipelines.synthetic import SyntheticLoader
from pipelines.torch_loader import FolderLoader, TensorLoader


def _limit(n: int, limit: int) -> int:
    return min(n, limit) if limit else n


def _pair_sampler(cfg, labels, rank: int, world: int):
    """CS-KD class-pair sampler for the training split (data.sampler=class_pair), else None."""
    if cfg.data.sampler != "class_pair":
        return None
    from pipelines.samplers import ClassPairBatchSampler

    return ClassPairBatchSampler(labels, cfg.data.batch_size, rank, world, cfg.seed,
                                 allow_self=cfg.objective.cskd.allow_self_partner)


def build_data(cfg, device: torch.device, rank: int = 0, world: int = 1) -> DataBundle:
    d = cfg.data
    if d.backend in ("dali", "dali-cpu"):
        from pipelines.dali import build_dali_data

        return build_dali_data(cfg, device, rank, world)
    mf = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    if d.backend == "synthetic" or d.dataset == "synthetic":
        k, c, s = cfg.model.num_classes, cfg.model.in_chans, d.image_size
        n = d.limit_train or 100 * d.batch_size
        train = SyntheticLoader(n, d.batch_size, k, c, s, device, memory_format=mf, seed=cfg.seed,
                                partners=d.sampler == "class_pair", extra_view=d.extra_view)
        val = SyntheticLoader(d.eval_batch_size, d.eval_batch_size, k, c, s, device, memory_format=mf, seed=cfg.seed)
        return DataBundle(train, val, None, k, c, [str(i) for i in range(k)])
    if d.dataset in ("fashion_mnist", "digits"):
        return _in_memory(cfg, device, rank, world, mf)
    return _folder(cfg, device, rank, world, mf)


def _in_memory(cfg, device, rank, world, mf) -> DataBundle:
    d = cfg.data
    if d.dataset == "fashion_mnist":
        splits, classes = load_fashion_mnist(d.root), FASHION_MNIST_CLASSES
    else:
        splits, classes = load_digits_split(), [str(i) for i in range(10)]
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    xval = yval = None
    if d.val_split:
        tr, va = carve(len(ytr), d.val_split, cfg.seed)
        xval, yval, xtr, ytr = xtr[va], ytr[va], xtr[tr], ytr[tr]
    ntr = _limit(len(ytr), d.limit_train)
    xtr, ytr = xtr[:ntr], ytr[:ntr]
    ne = _limit(len(yte), d.limit_eval)
    xte, yte = xte[:ne], yte[:ne]
    mean = torch.tensor(d.mean) if d.mean else (xtr.float() / 255).mean(dim=(0, 2, 3))
    std = torch.tensor(d.std) if d.std else (xtr.float() / 255).std(dim=(0, 2, 3))

    def mk(x, y, train):
        return TensorLoader(x, y, d.batch_size if train else d.eval_batch_size, train, d.augment, d.image_size,
                            mean, std, device, rank, world, cfg.seed, mf,
                            pairs=_pair_sampler(cfg, y, rank, world) if train else None,
                            extra_view=d.extra_view and train)

    val = mk(xval[: _limit(len(yval), d.limit_eval)], yval[: _limit(len(yval), d.limit_eval)], False) \
        if xval is not None else None
    return DataBundle(mk(xtr, ytr, True), val, mk(xte, yte, False), len(classes), xtr.shape[1], classes)


def _folder(cfg, device, rank, world, mf) -> DataBundle:
    d = cfg.data
    s = folder_splits(cfg)  # the same files and labels as the DALI backend reads
    mean, std = torch.tensor(s.mean), torch.tensor(s.std)

    def mk(samples, is_train):
        if samples is None:
            return None
        return FolderLoader(samples, d.batch_size if is_train else d.eval_batch_size, is_train, d.augment,
                            d.image_size, cfg.model.in_chans, mean, std, device, d.workers, rank, world, cfg.seed,
                            d.skip_corrupt, mf,
                            pairs=_pair_sampler(cfg, [y for _, y in samples], rank, world) if is_train else None,
                            extra_view=d.extra_view and is_train)

    return DataBundle(mk(s.train, True), mk(s.val, False), mk(s.test, False), len(s.classes), cfg.model.in_chans,
                      s.classes)
