"""`selfdistill data ...`: write Fashion-MNIST out as an ImageFolder tree, and check an ImageFolder tree.

    selfdistill data fashion-mnist --out DIR [--format png|jpeg] [--val N] [--root IDX_DIR]
                                   [--limit-train N] [--limit-test N] [--seed S]
    selfdistill data check DIR [--quick]

The written tree (DIR/{train,val,test}/<class>/<idx>.<ext>, <idx> = the image's index in its IDX file) reads the
same through every backend, so the demo runs through DALI exactly as ImageNet would.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.batch import DataError
from pipelines.datasets import FASHION_MNIST_CLASSES, IMAGE_EXTENSIONS, load_fashion_mnist
from pipelines.folder_splits import VAL_DIRS, carve
from pipelines.image_check import find_bad_images

JPEG_QUALITY = 95  # 28x28 grey images: high quality keeps the compression artefacts below the pixel noise
SPLITS = ("train",) + VAL_DIRS + ("test",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    fm = sub.add_parser("fashion-mnist", help="write Fashion-MNIST (IDX files) as ImageFolder train/val/test")
    fm.add_argument("--out", required=True, help="output folder (must not contain train/ yet)")
    fm.add_argument("--format", choices=("png", "jpeg"), default="png")
    fm.add_argument("--val", type=int, default=0, help="images carved from train into val/ (seed-fixed)")
    fm.add_argument("--root", default=None, help="folder of the IDX files (default: the Debian package's)")
    fm.add_argument("--limit-train", type=int, default=0, help="use only the first N training images (0 = all)")
    fm.add_argument("--limit-test", type=int, default=0, help="use only the first N test images (0 = all)")
    fm.add_argument("--seed", type=int, default=0, help="seed of the val carve")
    ck = sub.add_parser("check", help="class counts, unreadable or non-image files, classes missing from a split")
    ck.add_argument("dir")
    ck.add_argument("--quick", action="store_true", help="read each file's first/last bytes instead of decoding it")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return write_fashion_mnist(args) if args.cmd == "fashion-mnist" else check(Path(args.dir), args.quick)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------- fashion-mnist


def write_fashion_mnist(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "train").exists():
        raise DataError(f"{out / 'train'} already exists; remove it or choose another --out")
    for flag in ("val", "limit_train", "limit_test"):
        if getattr(args, flag) < 0:
            raise DataError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    data = load_fashion_mnist(args.root)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    train_idx = np.arange(args.limit_train or len(ytr))
    test_idx = np.arange(args.limit_test or len(yte))
    splits = {"test": (xte, yte, test_idx)}
    if args.val:
        keep, val = carve(len(train_idx), args.val, args.seed)
        splits["val"] = (xtr, ytr, np.sort(train_idx[val.numpy()]))
        train_idx = np.sort(train_idx[keep.numpy()])
    splits["train"] = (xtr, ytr, train_idx)
    # Written beside the target and renamed at the end: an interrupted run leaves no half tree behind.
    tmp = out.parent / (out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ext = {"png": "png", "jpeg": "jpg"}[args.format]
    for split, (x, y, idx) in splits.items():
        for c in FASHION_MNIST_CLASSES:
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
        for i in idx.tolist():
            img = Image.fromarray(x[i, 0].numpy())  # uint8 [28, 28] -> mode L
            path = tmp / split / FASHION_MNIST_CLASSES[int(y[i])] / f"{i:05d}.{ext}"
            img.save(path, **({"quality": JPEG_QUALITY} if args.format == "jpeg" else {}))
        print(f"{split}: {len(idx)} images")
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (tmp / split).rename(out / split)
    tmp.rmdir()
    print(f"wrote {out} ({args.format})")
    return 0


# ------------------------------------------------------------------------------------------------- check


def _scan_split(split_dir: Path) -> tuple[dict[str, list[Path]], list[Path], list[Path]]:
    """(class -> image files, non-image files, stray files outside class folders); hidden files are ignored."""
    classes, non_images, stray = {}, [], []
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            stray.append(entry)
            continue
        files = sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith("."))
        classes[entry.name] = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        non_images += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    return classes, non_images, stray


def check(root: Path, quick: bool = False) -> int:
    if not root.is_dir():
        raise DataError(f"{root} does not exist or is not a folder")
    present = [s for s in SPLITS if (root / s).is_dir()]
    problems: list[str] = []
    if "train" not in present:
        problems.append(f"{root} has no train/ folder")
    if not present:
        print("\n".join(problems))
        return 1
    per_split = {}
    for split in present:
        classes, non_images, stray = _scan_split(root / split)
        per_split[split] = classes
        problems += [f"empty class folder: {root / split / c}" for c, files in classes.items() if not files]
        problems += [f"non-image file: {p}" for p in non_images]
        problems += [f"file outside a class folder: {p}" for p in stray]
        files = [p for fs in classes.values() for p in fs]
        problems += [f"unreadable image: {p}: {why}" for p, why in find_bad_images(files, full=not quick)]
    _print_counts(per_split)
    if "train" in per_split:
        train = set(per_split["train"])
        for split, classes in per_split.items():
            if split == "train":
                continue
            missing, extra = sorted(train - set(classes)), sorted(set(classes) - train)
            if missing:
                problems.append(f"{split}/ lacks {len(missing)} class(es) present in train/: {', '.join(missing)}")
            if extra:
                problems.append(f"{split}/ has class(es) not in train/: {', '.join(extra)}")
    for line in problems:
        print(f"problem: {line}")
    print(f"{len(problems)} problem(s) found" if problems else "no problems found")
    return 1 if problems else 0


def _print_counts(per_split: dict[str, dict[str, list[Path]]]) -> None:
    splits = list(per_split)
    classes = sorted({c for cs in per_split.values() for c in cs})
    width = max([len(c) for c in classes] + [5])
    print(f"{'class':<{width}} " + " ".join(f"{s:>10}" for s in splits))
    totals = Counter()
    for c in classes:
        counts = [len(per_split[s].get(c, [])) for s in splits]
        totals.update(dict(zip(splits, counts, strict=True)))
        print(f"{c:<{width}} " + " ".join(f"{n:>10}" for n in counts))
    print(f"{'total':<{width}} " + " ".join(f"{totals[s]:>10}" for s in splits))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
