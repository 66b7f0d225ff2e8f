"""`build_dali_data`: data.backend = dali (GPU, mixed decode) or dali-cpu, for data.dataset = imagefolder.

Same folder rules, labels, splits and normalisation as the torch backend (`pipelines/folder_splits.py`); the
graphs are in `pipelines/dali_pipes.py`, the iterators in `pipelines/dali_loader.py`. Options read from `data.*`:
root, image_size, augment, batch_size, eval_batch_size, workers (= DALI CPU threads), dali_prefetch,
dali_hw_decoder_load, sampler, extra_view, skip_corrupt, val_split, split_seed, limit_train, limit_eval, mean, std.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from pipelines.base import DataBundle, LoaderSpec
from pipelines.batch import DataConfigError
from pipelines.folder_splits import Samples, folder_splits
from pipelines.image_check import find_bad_images
from pipelines.samplers import ClassPairBatchSampler

log = logging.getLogger(__name__)


def _check_backend(d, device: torch.device) -> str:
    if d.dataset != "imagefolder":
        raise DataConfigError(f"data.backend={d.backend} reads image folders, but data.dataset={d.dataset}; write "
                              "the images out (`selfdistill data fashion-mnist --out DIR`) and set "
                              "data.dataset=imagefolder data.root=DIR, or use data.backend=torch")
    if d.backend == "dali":
        if device.type != "cuda":
            raise DataConfigError(f"data.backend=dali decodes on the GPU but the training device is {device}; "
                                  "use data.backend=dali-cpu")
        return "mixed"
    return "cpu"


def _drop_corrupt(samples: Samples | None, split: str) -> tuple[Samples | None, int]:
    """data.skip_corrupt: DALI cannot skip a file mid-epoch, so bad files are left out before the pipeline is
    built. The quick check reads each file's first and last bytes; files it flags are fully decoded to confirm."""
    if not samples:
        return samples, 0
    bad = {p for p, _ in find_bad_images([p for p, _ in samples])}
    if bad:
        log.warning("data.skip_corrupt: leaving %d corrupt %s image(s) out, e.g. %s", len(bad), split,
                    ", ".join(sorted(bad)[:3]))
    return [s for s in samples if s[0] not in bad], len(bad)


def build_dali_data(d, device: torch.device, rank: int = 0, world: int = 1, *, seed: int, in_chans: int,
                    channels_last: bool = False, amp: str = "fp32", allow_self_partner: bool = True) -> DataBundle:
    """Loaders for the `data.*` options `d`; `amp` sets the output dtype, `allow_self_partner` the CS-KD sampler."""
    decoder = _check_backend(d, device)
    try:  # optional dependency: DALI
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise DataConfigError(f"data.backend={d.backend} needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(or `pip install -e .[dali]`), or use data.backend=torch") from None
    from pipelines.dali_loader import DaliFolderLoader, DaliPairLoader, torch_dtype  # optional dependency: DALI
    from pipelines.dali_pipes import Recipe  # optional dependency: DALI

    splits = folder_splits(d, seed, in_chans)
    fp16, out_dtype = torch_dtype(amp)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    # the same spec as the torch loaders'; DALI adds its decoder, output dtype and prefetch depth
    train_spec, eval_spec = (LoaderSpec.from_options(d, t, splits.mean, splits.std, mf, rank, world, seed)
                             for t in (True, False))

    def recipe_of(spec: LoaderSpec) -> Recipe:
        return Recipe.from_spec(spec, in_chans == 1, fp16, decoder, d.dali_hw_decoder_load)

    common = {"device": device, "seed": seed, "threads": d.workers, "prefetch": d.dali_prefetch,
              "out_dtype": out_dtype}
    skipped = {}
    train, val, test = splits.train, splits.val, splits.test
    if d.skip_corrupt:
        (train, skipped["train"]), (val, skipped["val"]), (test, skipped["test"]) = (
            _drop_corrupt(s, name) for s, name in ((train, "train"), (val, "val"), (test, "test")))

    if d.sampler == "class_pair":
        sampler = ClassPairBatchSampler([y for _, y in train], d.batch_size, rank, world, seed,
                                        allow_self=allow_self_partner)
        # the pair loader draws the second view itself: its pipeline makes one view per sample
        train_loader = DaliPairLoader(train, sampler, replace(recipe_of(train_spec), views=1),
                                      extra_view=train_spec.extra_view, **common)
    else:
        train_loader = DaliFolderLoader(train, recipe_of(train_spec), train_spec.batch_size, rank=rank, world=world,
                                        **common)
    eval_recipe = recipe_of(eval_spec)

    def evaluation(samples: Samples | None, split: str):
        if samples is None:
            return None
        loader = DaliFolderLoader(samples, eval_recipe, eval_spec.batch_size, rank=rank, world=world, **common)
        loader.skipped = skipped.get(split, 0)
        return loader

    train_loader.skipped = skipped.get("train", 0)
    return DataBundle(train_loader, evaluation(val, "val"), evaluation(test, "test"), len(splits.classes),
                      in_chans, splits.classes, {"mean": list(splits.mean), "std": list(splits.std)})
