"""DALI graphs (`@pipeline_def` + `nvidia.dali.fn`): file reader -> decode (+ crop) -> resize -> flip/normalise.

One graph serves training, evaluation and the ordered CS-KD pair lists; a `Recipe` says which augmentation and
which decoder. The geometry follows the torch path (`pipelines/torch_loader.py`, `pipelines/transforms.py`):
- random_resized_crop, train: Inception crop (area 8-100 %, aspect 3/4-4/3) decoded as a region of interest
  (`fn.decoders.image_random_crop`, so the rest of the JPEG is never decoded), resized to size x size, flipped
  with p = 0.5;
- random_resized_crop, eval: the central square of side round(0.875 * shorter side), computed exactly as
  `center_crop_box` does (integer arithmetic, round half to even), ROI-decoded and resized to size x size;
- crop_flip (32-px recipe) and none: the whole image resized to size x size; crop_flip then pads 4 px of zeros
  and takes a random size x size window, flipped with p = 0.5 (train only);
- `fn.crop_mirror_normalize` writes (x - 255 mean) / (255 std) straight into the output dtype and layout, so
  the flip, the normalisation, the cast and the NHWC/NCHW layout cost one pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode

READER = "reader"  # name of the file reader, for `pipe.reader_meta(READER)`

RRC_AREA = (0.08, 1.0)  # random-resized-crop area fraction (torchvision / `random_resized_crop_box`)
RRC_ASPECT = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10  # tries before the centre-crop fallback, as `random_resized_crop_box`
CROP_NUM, CROP_DEN = 7, 8  # eval crop fraction 0.875 = 7/8, kept rational so the side is rounded exactly
PAD = 4  # CIFAR recipe: zero padding before the random crop (`random_crop_flip(x, 4, ...)`)
FLIP_P = 0.5

# nvJPEG preallocation for the mixed (GPU) decoder, from NVIDIA's DALI ResNet-50 example: buffers sized for the
# largest ImageNet JPEG, so nvJPEG never reallocates (and synchronises) in the middle of an epoch.
NVJPEG_DEVICE_PADDING = 211_025_920  # bytes of device memory per decoding thread
NVJPEG_HOST_PADDING = 140_544_512  # bytes of pinned host memory, twice per thread (double buffering)
HW_DECODER_WIDTH_HINT, HW_DECODER_HEIGHT_HINT = 5980, 6430  # largest ImageNet image, for the A100/H100 JPEG engine


@dataclass(frozen=True)
class Recipe:
    size: int  # output side in pixels
    augment: str  # "none" | "crop_flip" | "random_resized_crop" (data.augment)
    train: bool
    gray: bool  # decode to 1 channel (model.in_chans == 1)
    mean: tuple[float, ...]  # 0..1 units, as data.mean
    std: tuple[float, ...]
    fp16: bool  # FLOAT16 output (AMP); FLOAT otherwise
    channels_last: bool  # NHWC buffer (viewed as channels_last NCHW) or NCHW buffer
    decoder: str = "cpu"  # "cpu" | "mixed" (GPU, nvJPEG + hardware JPEG engine)
    hw_decoder_load: float = 0.65  # share of JPEGs sent to the hardware engine (data.dali_hw_decoder_load)
    views: int = 1  # independent augmentations of each sample in one batch (2 with data.extra_view)

    @classmethod
    def from_spec(cls, spec, gray: bool, fp16: bool, decoder: str, hw_decoder_load: float) -> "Recipe":
        """The DALI pipeline of a pipelines.base.LoaderSpec (the torch loaders' spec), plus what only DALI has."""
        return cls(size=spec.image_size, augment=spec.augment, train=spec.train, gray=gray, mean=spec.mean,
                   std=spec.std, fp16=fp16, channels_last=spec.memory_format == torch.channels_last, decoder=decoder,
                   hw_decoder_load=hw_decoder_load, views=2 if spec.extra_view else 1)


def _decoder_args(r: Recipe) -> dict:
    args = {"device": r.decoder, "output_type": types.GRAY if r.gray else types.RGB}
    if r.decoder == "mixed":
        args.update(device_memory_padding=NVJPEG_DEVICE_PADDING, host_memory_padding=NVJPEG_HOST_PADDING,
                     preallocate_width_hint=HW_DECODER_WIDTH_HINT, preallocate_height_hint=HW_DECODER_HEIGHT_HINT,
                     hw_decoder_load=r.hw_decoder_load)
    return args


def _center_square(encoded: DataNode) -> tuple[DataNode, DataNode]:
    """(anchor [top, left], shape [side, side]) of `center_crop_box`: side = round_half_even(short * 7/8)."""
    hwc = fn.peek_image_shape(encoded, dtype=types.INT32)
    h, w = hwc[0], hwc[1]
    scaled = dmath.min(h, w) * CROP_NUM
    q = scaled // CROP_DEN
    twice_rem = 2 * (scaled - q * CROP_DEN)
    q_odd = q - (q // 2) * 2
    side = q + (twice_rem > CROP_DEN) + (twice_rem == CROP_DEN) * q_odd  # Python's round(): ties go to even
    return fn.stack((h - side) // 2, (w - side) // 2), fn.stack(side, side)


def _pad_crop(img: DataNode, size: int) -> DataNode:
    shift = fn.random.uniform(values=[float(v) for v in range(-PAD, PAD + 1)], shape=[2])
    return fn.slice(img, start=fn.cast(shift, dtype=types.INT32), shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def _augment(encoded: DataNode, r: Recipe) -> DataNode:
    s = r.size
    flip = r.train and r.augment != "none"
    if r.augment == "random_resized_crop" and r.train:
        img = fn.decoders.image_random_crop(encoded, random_area=list(RRC_AREA), random_aspect_ratio=list(RRC_ASPECT),
                                            num_attempts=RRC_ATTEMPTS, **_decoder_args(r))
    elif r.augment == "random_resized_crop":
        anchor, shape = _center_square(encoded)
        img = fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", **_decoder_args(r))
    else:
        img = fn.decoders.image(encoded, **_decoder_args(r))
    img = fn.resize(img, size=[s, s], antialias=True)  # linear + antialias ~ PIL BILINEAR when shrinking
    if r.augment == "crop_flip" and r.train:
        img = _pad_crop(img, s)
    return fn.crop_mirror_normalize(
        img, dtype=types.FLOAT16 if r.fp16 else types.FLOAT, output_layout="HWC" if r.channels_last else "CHW",
        mean=[255.0 * m for m in r.mean], std=[255.0 * v for v in r.std],
        mirror=fn.random.coin_flip(probability=FLIP_P) if flip else 0)


@pipeline_def(exec_dynamic=True)  # dynamic executor: outputs are fresh buffers, safe to hand to torch zero-copy
def image_pipeline(files: list[str], labels: list[int], recipe: Recipe, shard_id: int = 0, num_shards: int = 1,
                   shuffle: bool = False, shuffle_seed: int = 0):
    """Outputs: `recipe.views` image batches, then labels (int32 [N, 1]).

    shuffle=True reshuffles the whole list every epoch with a seed shared by all ranks (`shuffle_after_epoch`), so
    the ranks' shards stay disjoint and each epoch is a fresh global permutation. (`random_shuffle` would shuffle
    the list once, at a fixed seed, and then only within a 1024-sample window: the same neighbourhoods every
    epoch.) `pad_last_batch` repeats a shard's last sample up to the epoch's batch count; the loader trims it.
    """
    order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed} if shuffle else \
        {"stick_to_shard": True}
    encoded, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                     pad_last_batch=True, name=READER, **order)
    return (*[_augment(encoded, recipe) for _ in range(recipe.views)], label)
