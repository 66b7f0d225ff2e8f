"""Raw datasets: Fashion-MNIST IDX files, scikit-learn digits, and ImageFolder trees.

In-memory sets come back as uint8 [N, C, H, W] tensors plus int64 labels; folders as (path, label) lists.
Every bad input raises `DataError` naming the file or folder.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from pipelines.batch import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def read_idx(path: Path) -> np.ndarray:
    """IDX format (LeCun): magic (0, 0, dtype code, ndim), big-endian dims, then the raw array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08:
                raise DataError(f"{path}: not an unsigned-byte IDX file (magic {zero:#x}, type {dtype_code:#x})")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"{path}: cannot read IDX file: {e}") from None
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({data.size} bytes for shape {shape})")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root} "
                    "(install the Debian package dataset-fashion-mnist or set data.root)")


def load_fashion_mnist(root: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    root_p = Path(root or FASHION_MNIST_DIR)
    if not root_p.is_dir():
        raise DataError(f"data.root {root_p} does not exist (install dataset-fashion-mnist or set data.root)")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(root_p, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(root_p, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise DataError(f"{root_p}: {split} has {len(x)} images but {len(y)} labels")
        out[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return out


def load_digits_split(test_fraction: float = 0.2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 digits (0..16 grey levels) as uint8 0..255, with a fixed stratified-free split."""
    from sklearn.datasets import load_digits  # start-up time: scikit-learn takes a second to import, digits only

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(len(y) * test_fraction)
    return {"train": (x[perm[n_test:]], y[perm[n_test:]]), "test": (x[perm[:n_test]], y[perm[:n_test]])}


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """root/<class>/<image>: sorted classes, sorted files. An empty class folder is an error naming it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"image folder {root} has no class sub-folders")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{root}: classes {extra} are not in the training set")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"class folder {root / c} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(str(p), index[c]) for p in files]
    return samples, classes


def split_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None
