"""Small ImageFolder trees of real photos (scikit-image's sample images) for the data-pipeline tests.

Class c is photo PHOTOS[c]; its samples are random crops (40-100 % of each side), half of them mirrored, shrunk
to a shorter side of `min_side`..`max_side` px so the tests stay fast. Real photos rather than noise: decoders and
resizers see the content they were built for, and the classes are learnable. `tint=True` puts class c's grey
texture in colour channel c only, so a test can read an image's class from its channel means.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)


def _sample(src: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = src[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = Image.fromarray(np.ascontiguousarray(crop))
    scale = int(rng.integers(min_side, max_side + 1)) / min(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)


def write_photo_folder(root: str | Path, splits: dict[str, int], classes: int = 3, min_side: int = 40,
                       max_side: int = 72, fmt: str = "jpeg", seed: int = 0, tint: bool = False) -> Path:
    """root/<split>/<photo name>/<NNN>.<jpg|png> with `splits[split]` images per class; returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    ext = {"jpeg": "jpg", "png": "png"}[fmt]
    for split, per_class in splits.items():
        for c in range(classes):
            src = photo(PHOTOS[c])
            out = root / split / PHOTOS[c]
            out.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                im = _sample(src, rng, min_side, max_side)
                if tint:
                    rgb = np.zeros((im.height, im.width, 3), np.uint8)
                    rgb[..., c % 3] = 64 + np.asarray(im.convert("L")) // 2  # 64..191: clearly channel c
                    im = Image.fromarray(rgb)
                im.save(out / f"{i:03d}.{ext}", **({"quality": 90} if fmt == "jpeg" else {}))
    return root


def image_files(root: str | Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())
