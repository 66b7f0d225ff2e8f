"""Augmentations written with torch ops (no torchvision), batched on the training device.

Randomness comes from an explicit generator seeded by (seed, epoch, batch, rank), so an epoch's augmentation is
reproducible and a resumed run sees exactly the images an uninterrupted one would.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seeded_generator(device: torch.device, *keys: int) -> torch.Generator:
    seed = 0
    for k in keys:  # simple mixing; distinct (seed, epoch, batch, rank) tuples give distinct streams
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def random_crop_flip(x: Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> Tensor:
    """The CIFAR recipe: zero-pad by `pad`, random crop back to the input size, horizontal flip with p=0.5."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # [n, h]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # [n, w]
    if flip:
        do_flip = torch.rand(n, device=x.device, generator=gen) < 0.5
        cols = torch.where(do_flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2)


def normalize(x: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [N, C, H, W] -> (x/255 - mean) / std in `dtype`."""
    return ((x.to(torch.float32) / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(dtype)


def random_resized_crop_box(width: int, height: int, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom): 10 tries, then the centre crop of the clamped ratio."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, crop_fraction: float = 0.875) -> tuple[int, int, int, int]:
    """Resize-shorter-side-then-centre-crop expressed as one box: the central square of side short*fraction."""
    side = int(round(min(width, height) * crop_fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side
