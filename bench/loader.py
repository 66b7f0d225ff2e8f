"""`selfdistill bench loader`: training-loader throughput (images/s) of each data backend, side by side.

Every backend reads the same folder (DIR/train/<class>/*.jpg) through the loader training uses
(`engine.setup_run.data_from_config(cfg).train`: random-resized crop to --size, flip, normalise, on the device), with
data.workers = --workers (DALI CPU threads, or DataLoader processes for torch). Without --root, a folder of
full-size JPEGs (random 50-100 % crops of scikit-image's photos, up to 1411 px, Pillow quality 90, one class per
photo) is made once in a cache folder. Wall time over --batches batches per repeat, after --warmup batches, with the
device synchronised at both ends (GPU outputs count the work, not its launch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from bench.measure import Timer, endless, stats, synchronize
from bench.report import base_parser, csv_list, fail, md_table, provenance, provenance_md, start, write_report
from engine.config import load_config
from engine.setup_run import data_from_config

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle")
CROP_RANGE = (0.5, 1.0)  # side fraction of each random crop: images stay "full size" (hundreds of px to 1411)
NAMES = {"dali": "dali (mixed)", "dali-cpu": "dali-cpu", "torch": "torch (DataLoader + PIL)", "synthetic": "synthetic"}
NO_GPU = "not available (no GPU)"


def make_photo_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/train/<photo>/<NNN>.jpg; kept when it already holds per_class images of every photo."""
    from skimage import data  # scikit-image: only for the generated folder

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        out = root / "train" / name
        if out.is_dir() and len(list(out.glob("*.jpg"))) == per_class:
            continue
        out.mkdir(parents=True, exist_ok=True)
        src = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        src = src[..., :3] if src.ndim == 3 else np.stack([src] * 3, -1)
        h, w = src.shape[:2]
        for i in range(per_class):
            ch, cw = int(h * rng.uniform(*CROP_RANGE)), int(w * rng.uniform(*CROP_RANGE))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = src[y:y + ch, x:x + cw][:, ::-1 if rng.random() < 0.5 else 1]
            Image.fromarray(np.ascontiguousarray(crop)).save(out / f"{i:03d}.jpg", quality=90)
    return root


def build_parser():
    p = base_parser("selfdistill bench loader", __doc__)
    p.add_argument("--root", help="ImageFolder root with train/ (default: generated photo JPEGs)")
    p.add_argument("--backends", default="dali-cpu,torch,dali", help="comma-separated data.backend values")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads / processes")
    p.add_argument("--size", type=int, default=224, help="output side (px)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50, help="timed batches per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (pipeline start, caches)")
    p.add_argument("--amp", choices=("fp32", "fp16", "bf16"), default="fp16", help="precision.amp: output dtype")
    p.add_argument("--per-class", type=int, default=48, help="images per class of the generated folder")
    p.add_argument("--cache", help="where the generated folder lives (default ~/.cache/selfdistill)")
    return p


def bench_backend(root: Path, backend: str, args, classes: int) -> dict[str, Any]:
    row: dict[str, Any] = {"backend": NAMES[backend]}
    if backend == "dali" and not torch.cuda.is_available():
        return {**row, "status": NO_GPU}
    device = torch.device("cuda" if backend == "dali" else "cpu")
    source = ["data.dataset=synthetic"] if backend == "synthetic" else ["data.dataset=imagefolder",
                                                                         f"data.backend={backend}"]
    cfg = load_config(None, [*source, f"data.root={root}", f"data.image_size={args.size}",
                             "data.augment=random_resized_crop", f"data.batch_size={args.batch_size}",
                             f"data.workers={args.workers}", f"model.num_classes={classes}",
                             f"precision.amp={args.amp}", "precision.channels_last=true"])
    loader = data_from_config(cfg, device).train

    batches, rates = endless(loader), []
    for _ in range(args.repeats):
        for _ in range(args.warmup):
            next(batches)
        timer, images = Timer(torch.device("cpu")), 0
        synchronize(device)
        timer.mark()
        for _ in range(args.batches):
            batch = next(batches)
            images += len(batch)
        synchronize(device)
        timer.mark()
        rates.append(images / timer.seconds()[0])
    return {**row, "status": "ok", "device": str(device), "img_s": stats(rates, 1),
            "batches_per_epoch": len(loader), "dtype": str(batch.images.dtype).replace("torch.", "")}


def folder_stats(root: Path) -> dict[str, Any]:
    files = sorted((root / "train").rglob("*.jpg"))
    sizes = [Image.open(f).size for f in files[:: max(1, len(files) // 64)]] or [(0, 0)]  # a sample is enough
    return {"root": str(root), "train_images": len(files), "classes": len({f.parent.name for f in files}),
            "mean_kib": int(np.mean([f.stat().st_size for f in files] or [0]) / 1024),
            "mean_size": [int(np.mean([s[i] for s in sizes])) for i in (0, 1)]}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device, out_dir = start(args, "loader")
    backends = csv_list(args.backends, str, tuple(NAMES), "--backends")
    cache = Path(args.cache) if args.cache else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "selfdistill" / "bench-photos"
    root = Path(args.root) if args.root else make_photo_folder(cache, args.per_class)
    folder = folder_stats(root)
    if folder["train_images"] == 0:
        fail(f"no JPEGs under {root / 'train'}")
    settings = {k: getattr(args, k) for k in ("size", "batch_size", "workers", "batches", "warmup", "repeats", "amp")}
    rows = [bench_backend(root, b, args, folder["classes"]) for b in backends]
    payload = {"kind": "bench-loader", "provenance": provenance(device), "settings": settings, "folder": folder,
               "results": rows}
    md = (f"# Loader throughput: `selfdistill bench loader`\n\n{provenance_md(payload['provenance'])}\n"
          f"{folder['train_images']} JPEGs in {folder['classes']} classes (mean {folder['mean_size'][0]}x"
          f"{folder['mean_size'][1]} px, {folder['mean_kib']} KiB), random-resized crop to {args.size} px + flip + "
          f"normalise, batch {args.batch_size}, {args.workers} decode workers, precision.amp={args.amp}; "
          f"{args.repeats} x {args.batches} batches, each after {args.warmup} warm-up batches.\n\n")
    rate = {r["backend"]: f"{r['img_s']['mean']:.1f} ± {r['img_s']['std']:.1f}" if r["status"] == "ok" else
            r["status"] for r in rows}
    md += md_table(["backend", "images/s (mean ± std)", "repeats", "output dtype", "device"], [
        [r["backend"], rate[r["backend"]], *([", ".join(map(str, r["img_s"]["values"])), r["dtype"], r["device"]]
                                             if r["status"] == "ok" else ["", "", ""])] for r in rows])
    for name, r in rate.items():
        print(f"{name:>26}: {r}")
    print(f"report: {write_report(out_dir, payload, md)['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
