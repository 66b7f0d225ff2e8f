"""`selfdistill bench loader`: training-loader throughput (images/s) of each data backend, side by side.

    selfdistill bench loader [--root DIR] [--backends dali-cpu,torch,dali] [--threads N] [--size 224]
                             [--batch-size 64] [--batches N] [--repeats 3] [--per-class 48] [--out DIR]

Every backend reads the same folder (DIR/train/<class>/*.jpg) through the loader training would use
(`engine.setup_run.data_from_config(cfg).train`: random-resized crop to --size, flip, normalise, on the device), with
data.workers = --threads (DALI CPU threads, or DataLoader processes for torch). Without --root, a folder of
full-size JPEGs (random 50-100 % crops of scikit-image's photos, up to 1411 px, Pillow quality 90, one class per
photo) is made once in a cache folder. Results: bench/results/loader-<date>-<host>/results.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle")
JPEG_QUALITY = 90
CROP_RANGE = (0.5, 1.0)  # side fraction of each random crop: images stay "full size" (hundreds of px to 1411)
RESULTS = Path(__file__).resolve().parent / "results"
NO_GPU = "not available (no GPU)"


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)


def make_photo_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/train/<photo>/<NNN>.jpg; kept when it already holds per_class images of every photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        out = root / "train" / name
        if out.is_dir() and len(list(out.glob("*.jpg"))) == per_class:
            continue
        out.mkdir(parents=True, exist_ok=True)
        src = _photo(name)
        h, w = src.shape[:2]
        for i in range(per_class):
            ch, cw = int(h * rng.uniform(*CROP_RANGE)), int(w * rng.uniform(*CROP_RANGE))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = src[y:y + ch, x:x + cw]
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            Image.fromarray(np.ascontiguousarray(crop)).save(out / f"{i:03d}.jpg", quality=JPEG_QUALITY)
    return root


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfdistill" / "bench-photos"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill bench loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="ImageFolder root with train/ (default: generated photo JPEGs)")
    p.add_argument("--backends", default="dali-cpu,torch,dali", help="comma-separated data.backend values")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="decode threads/processes")
    p.add_argument("--size", type=int, default=224, help="output side (px)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=50, help="timed batches per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (pipeline start, caches)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--amp", choices=("fp32", "fp16", "bf16"), default="fp16", help="precision.amp: output dtype")
    p.add_argument("--per-class", type=int, default=48, help="images per class of the generated folder")
    p.add_argument("--cache", default=None, help="where the generated folder lives (default ~/.cache/selfdistill)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/loader-<date>-<host>)")
    return p


def _config(root: Path, backend: str, args: argparse.Namespace, classes: int):
    from engine.config import load_config

    source = ["data.dataset=synthetic"] if backend == "synthetic" else [
        "data.dataset=imagefolder", f"data.root={root}", f"data.backend={backend}"]
    return load_config(None, source + [
        f"data.image_size={args.size}", "data.augment=random_resized_crop", f"data.batch_size={args.batch_size}",
        f"data.workers={args.threads}", f"model.num_classes={classes}", f"precision.amp={args.amp}",
        "precision.channels_last=true"])


def _measure(loader, batches: int, warmup: int, device) -> tuple[float, int, str]:
    """Seconds, images and output dtype for `batches` batches after `warmup`, crossing epochs as training does."""
    import torch

    def stream():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = stream()
    for _ in range(warmup):
        next(it)
    images = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        images += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU outputs: count the work, not its launch
    return time.perf_counter() - t0, images, str(batch.images.dtype).replace("torch.", "")


def bench_backend(root: Path, backend: str, args: argparse.Namespace, classes: int) -> dict:
    import torch

    from engine.setup_run import data_from_config

    if backend == "dali" and not torch.cuda.is_available():
        return {"backend": "dali (mixed)", "status": NO_GPU}
    device = torch.device("cuda" if backend == "dali" else "cpu")
    loader = data_from_config(_config(root, backend, args, classes), device).train
    rates = []
    for _ in range(args.repeats):
        seconds, images, dtype = _measure(loader, args.batches, args.warmup, device)
        rates.append(images / seconds)
    name = {"dali": "dali (mixed)", "dali-cpu": "dali-cpu", "torch": "torch (DataLoader + PIL)"}.get(backend, backend)
    return {"backend": name, "status": "ok", "device": str(device), "img_per_s": round(statistics.median(rates), 1),
            "img_per_s_runs": [round(r, 1) for r in rates], "batches_per_epoch": len(loader), "dtype": dtype}


def _environment() -> dict:
    import PIL
    import torch

    from engine.rundir import git_commit

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = "not installed"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "nvidia_dali": dali_version, "pillow": PIL.__version__, "numpy": np.__version__,
            "cpu_count": os.cpu_count(), "cpu": cpu, "load_avg_1min": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def _folder_stats(root: Path) -> dict:
    from PIL import Image

    files = sorted((root / "train").rglob("*.jpg"))
    sizes = [Image.open(f).size for f in files[:: max(1, len(files) // 64)]]  # a sample is enough
    return {"root": str(root), "train_images": len(files), "classes": len({f.parent.name for f in files}),
            "mean_bytes": int(np.mean([f.stat().st_size for f in files])) if files else 0,
            "mean_width": int(np.mean([s[0] for s in sizes])) if sizes else 0,
            "mean_height": int(np.mean([s[1] for s in sizes])) if sizes else 0}


def _markdown(report: dict) -> str:
    env, s, folder = report["environment"], report["settings"], report["folder"]
    lines = [f"# Loader throughput, {env['date'][:10]}, {env['host']}", "",
             f"`{report['command']}`", "",
             (f"{folder['train_images']} JPEGs in {folder['classes']} classes (mean {folder['mean_width']}x"
              f"{folder['mean_height']} px, {folder['mean_bytes'] // 1024} KiB), random-resized crop to "
              f"{s['size']} px + flip + normalise, batch {s['batch_size']}, {s['threads']} decode threads/processes, "
              f"precision.amp={s['amp']}; median of {s['repeats']} x {s['batches']} batches after {s['warmup']} "
              "warm-up batches."), "",
             "| backend | images/s (median) | runs | output dtype | device |", "|---|---|---|---|---|"]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | {r['status']} | | | |")
        else:
            lines.append(f"| {r['backend']} | {r['img_per_s']:.1f} | {', '.join(map(str, r['img_per_s_runs']))} | "
                         f"{r['dtype']} | {r['device']} |")
    lines += ["", (f"git {env['git_commit']}; Python {env['python']}, torch {env['torch']}, "
                   f"DALI {env['nvidia_dali']}, Pillow {env['pillow']}, NumPy {env['numpy']}; {env['cpu_count']} "
                   f"CPUs ({env['cpu']}), 1-min load average {env['load_avg_1min']:.1f} at the start; "
                   f"GPU: {env['gpu']}."), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"dali", "dali-cpu", "torch", "synthetic"})
    if unknown:
        print(f"error: --backends: unknown {unknown}; allowed: dali, dali-cpu, torch, synthetic", file=sys.stderr)
        return 2
    root = Path(args.root) if args.root else make_photo_folder(Path(args.cache) if args.cache else _default_cache(),
                                                               args.per_class)
    folder = _folder_stats(root)
    if folder["train_images"] == 0:
        print(f"error: no JPEGs under {root / 'train'}", file=sys.stderr)
        return 2
    report = {"command": "selfdistill bench loader " + " ".join(argv), "environment": _environment(),
              "settings": {k: getattr(args, k) for k in ("size", "batch_size", "threads", "batches", "warmup",
                                                         "repeats", "amp")},
              "folder": folder, "results": []}
    for backend in backends:
        result = bench_backend(root, backend, args, folder["classes"])
        report["results"].append(result)
        print(f"{result['backend']:>26}: " + (f"{result['img_per_s']:.1f} img/s" if result["status"] == "ok"
                                             else result["status"]), flush=True)
    env = report["environment"]
    out = Path(args.out) if args.out else RESULTS / f"loader-{env['date'][:10]}-{env['host']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(report))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
