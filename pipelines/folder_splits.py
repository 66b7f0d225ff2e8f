"""ImageFolder root -> train / val / test sample lists, with the same rules for every backend.

The rules are those of `pipelines.factory._folder` (torch backend), factored out so the DALI backend reads exactly
the same files with the same labels: root/train/ is required; val/ (or valid/, validation/) and test/ are
optional; `data.val_split` carves a seed-fixed validation set out of train, and then the folder's own val/ becomes
the test set when there is no test/ (ImageNet convention); `limit_train` / `limit_eval` keep N spread evenly over
the classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipelines.batch import DataError
from pipelines.datasets import scan_image_folder, split_dir
from pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD

Samples = list[tuple[str, int]]
VAL_DIRS = ("val", "valid", "validation")
_CARVE_SEED_OFFSET = 12345  # the torch path's `_carve` offset: the same seed carves the same validation images


@dataclass
class FolderSplits:
    train: Samples
    val: Optional[Samples]
    test: Optional[Samples]
    classes: list[str]
    mean: list[float]  # 0..1 units, per channel
    std: list[float]


def split_seed(d, seed: int) -> int:
    """The seed that fixes which images are train, validation and (with label noise) relabelled."""
    return seed if d.split_seed is None else d.split_seed


def carve(n: int, val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed-fixed split of n training indices into (train, val)."""
    if val >= n:
        raise DataError(f"data.val_split={val} leaves no training data (train has {n} samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + _CARVE_SEED_OFFSET))
    return perm[val:], perm[:val]


def _limit(samples: Optional[Samples], limit: int) -> Optional[Samples]:
    """N samples spread over the classes: class by class in turn, each class's in list order (a folder lists its
    files class after class, so the first N would be a few classes only); the kept ones stay in list order."""
    if samples is None or not limit or limit >= len(samples):
        return samples
    seen: dict[int, int] = {}
    rank = []
    for _, y in samples:
        rank.append(seen.get(y, 0))
        seen[y] = rank[-1] + 1
    keep = sorted(sorted(range(len(samples)), key=lambda i: (rank[i], samples[i][1]))[:limit])
    return [samples[i] for i in keep]


def folder_splits(d, seed: int, in_chans: int) -> FolderSplits:
    """The splits of the image folder `d.root` under the `data.*` options `d`; `in_chans` picks the default
    normalisation (ImageNet's for RGB, 0.5 otherwise)."""
    if d.root is None:
        raise DataError("data.dataset=imagefolder needs data.root (a folder with train/ and val/ or test/)")
    root = Path(d.root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist")
    train_dir = split_dir(root, ("train",))
    if train_dir is None:
        raise DataError(f"{root} has no train/ folder (expected root/train/<class>/<image>)")
    train, classes = scan_image_folder(train_dir)
    val_dir, test_dir = split_dir(root, VAL_DIRS), split_dir(root, ("test",))
    val = scan_image_folder(val_dir, classes)[0] if val_dir else None
    test = scan_image_folder(test_dir, classes)[0] if test_dir else None
    if d.val_split:
        tr, va = carve(len(train), d.val_split, split_seed(d, seed))
        test = test if test is not None else val
        train, val = [train[i] for i in tr], [train[i] for i in va]
    c = in_chans
    mean = list(d.mean or (IMAGENET_MEAN if c == 3 else [0.5] * c))
    std = list(d.std or (IMAGENET_STD if c == 3 else [0.5] * c))
    return FolderSplits(_limit(train, d.limit_train), _limit(val, d.limit_eval), _limit(test, d.limit_eval),
                        classes, mean, std)
