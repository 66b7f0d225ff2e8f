"""Thin iterators over DALI pipelines that implement the `Loader` protocol and yield `Batch` on the device.

Instead of DALIGenericIterator this drives `pipe.run()` itself and keeps the epoch arithmetic explicit, because
the traps of DALI issues 1776/2881 live there. Facts it relies on (checked by tests/test_dali.py):
- a sharded reader gives shard r the items [floor(r N/S), floor((r+1) N/S)) of the epoch's order;
- with pad_last_batch every shard yields ceil(ceil(N/S) / B) batches per epoch, the missing samples (up to whole
  batches on a smaller shard) being copies of the shard's last sample;
- the reader never stops: the next run() continues with the next epoch, and the pipeline prefetches across it.
So each loader consumes exactly one reader epoch per pass (yielding what it needs, trimming padding, draining the
rest), and a pass abandoned half-way is drained at the start of the next one.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from pipelines.batch import Batch, DataError
from pipelines.dali_pipes import Recipe, image_pipeline
from pipelines.image_check import find_bad_images
from pipelines.samplers import ClassPairBatchSampler
from pipelines.transforms import seeded_generator

MAX_NAMED = 5  # corrupt files listed in an error message
FULL_SCAN_LIMIT = 20_000  # beyond this many candidate files, a failed decode is not hunted down by full decodes


def dali_seed(*keys: int) -> int:
    """DALI wants a non-negative 32-bit seed; distinct (seed, rank, epoch, ...) give distinct streams."""
    return int(seeded_generator(torch.device("cpu"), *keys).initial_seed() % (2**31 - 1))


def dali_batches_per_epoch(n: int, shards: int, batch_size: int) -> int:
    return math.ceil(math.ceil(n / shards) / batch_size)


class _DaliLoaderBase:
    """Pipeline life cycle, output conversion, pass bookkeeping and error translation."""

    def __init__(self, files: list[str], recipe: Recipe, batch_size: int, device: torch.device, threads: int,
                 prefetch: int, seed: int, rank: int, out_dtype: torch.dtype, what: str):
        self.files, self.recipe, self.batch_size = files, recipe, batch_size
        self.device, self.threads, self.prefetch = device, max(1, threads), prefetch
        self.seed, self.rank, self.out_dtype, self.what = seed, rank, out_dtype, what
        self.epoch, self.start_batch = 0, 0
        self.skipped = 0  # corrupt files left out (data.skip_corrupt), counted once at build time
        self._pipe = None
        self._left = 0  # batches of the reader's current epoch not consumed yet

    # -- Loader protocol
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    # -- pipeline
    def _build(self, files: list[str], labels: list[int], batch_size: int, seed: int, **reader) -> None:
        self.close()
        self._pipe = image_pipeline(files, labels, self.recipe, batch_size=batch_size, num_threads=self.threads,
                                    device_id=self._device_id(), seed=seed, prefetch_queue_depth=self.prefetch,
                                    **reader)
        try:
            self._pipe.build()
        except RuntimeError as e:
            self._pipe = None
            raise DataError(f"cannot build the DALI {self.what} pipeline: {e}") from None

    def _device_id(self) -> int | None:
        if self.recipe.decoder != "mixed":
            return None  # a CPU-only pipeline: no CUDA context, runs without a GPU
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def close(self) -> None:
        self._pipe, self._left = None, 0  # DALI frees the pipeline's threads and buffers with the object

    def _run(self, candidates: Callable[[], list[str]]) -> list[Tensor]:
        try:
            outs = self._pipe.run()
        except RuntimeError as e:
            self.close()  # a failed DALI pipeline cannot run again
            raise self._decode_error(e, candidates()) from None
        self._left -= 1
        return [self._to_torch(o) for o in outs]

    def _to_torch(self, out) -> Tensor:
        dense = out.as_tensor()
        ctx = torch.cuda.device(self.device) if self.recipe.decoder == "mixed" else contextlib.nullcontext()
        with ctx:  # from_dlpack orders DALI's stream before torch's current stream
            return torch.from_dlpack(dense)  # zero-copy; the dynamic executor never reuses a handed-out buffer

    def _images(self, t: Tensor) -> Tensor:
        t = t.to(self.device, non_blocking=True)
        if self.recipe.channels_last:
            t = t.permute(0, 3, 1, 2)  # NHWC buffer seen as NCHW: a channels_last tensor, no copy
        return t if t.dtype == self.out_dtype else t.to(self.out_dtype)  # bf16: DALI writes fp16, cast here

    def _labels(self, t: Tensor) -> Tensor:
        return t.reshape(-1).to(self.device, torch.long, non_blocking=True)

    def _drain(self, candidates: Callable[[], list[str]]) -> None:
        while self._pipe is not None and self._left > 0:
            self._run(candidates)

    def _decode_error(self, err: RuntimeError, candidates: list[str]) -> DataError:
        lines = [ln.strip() for ln in str(err).splitlines()]
        what = " ".join(dict.fromkeys(ln for ln in lines if "operator" in ln or "failure" in ln)) or lines[0]
        bad = find_bad_images(candidates, limit=MAX_NAMED)
        if not bad and len(candidates) <= FULL_SCAN_LIMIT:
            bad = find_bad_images(candidates, full=True, limit=MAX_NAMED)
        if bad:
            listed = "; ".join(f"{p}: {why}" for p, why in bad)
            return DataError(f"DALI {self.what} pipeline failed on corrupt image(s): {listed} "
                             "(set data.skip_corrupt=true to leave such files out)")
        return DataError(f"DALI {self.what} pipeline failed ({what}) on one of {len(candidates)} files, "
                         "none of which PIL finds corrupt; run `selfdistill data check <root>` to inspect the folder")


class DaliFolderLoader(_DaliLoaderBase):
    """Plain training (sharded by DALI, reshuffled every epoch) or evaluation (each rank its own strided list).

    Training order comes from the reader's own epoch counter, so a resumed run (set_epoch(e, start_batch=k) on a
    fresh loader) trains the remaining len - k batches of an epoch in a new order, not the interrupted one's."""

    def __init__(self, samples: list[tuple[str, int]], recipe: Recipe, batch_size: int, device: torch.device,
                 rank: int = 0, world: int = 1, seed: int = 0, threads: int = 2, prefetch: int = 2,
                 out_dtype: torch.dtype = torch.float32):
        super().__init__([p for p, _ in samples], recipe, batch_size, device, threads, prefetch, seed, rank,
                         out_dtype, "train" if recipe.train else "eval")
        self.labels = [y for _, y in samples]
        self.world = world
        n = len(samples)
        if recipe.train:
            # Every rank stops at the smallest shard's full batches, so all ranks take the same number of steps.
            self.num_samples = n // world
            self._steps = self.num_samples // batch_size
            self._reader_batches = dali_batches_per_epoch(n, world, batch_size)
        else:
            # The torch path's eval sharding (arange(rank, n, world)): each sample on exactly one rank, no padding.
            self.files, self.labels = self.files[rank::world], self.labels[rank::world]
            self.num_samples = len(self.files)
            self._steps = self._reader_batches = math.ceil(self.num_samples / batch_size)

    def __len__(self) -> int:
        return self._steps

    def _ensure_pipeline(self) -> None:
        if self._pipe is not None:
            return
        if self.recipe.train:  # one seed for the shuffle on all ranks; augmentation differs by rank
            self._build(self.files, self.labels, self.batch_size, dali_seed(self.seed, self.rank, self.epoch),
                        shard_id=self.rank, num_shards=self.world, shuffle=True,
                        shuffle_seed=dali_seed(self.seed, self.epoch))
        else:
            self._build(self.files, self.labels, self.batch_size, dali_seed(self.seed, self.rank))

    def __iter__(self) -> Iterator[Batch]:
        if self._steps == 0:
            return
        self._ensure_pipeline()
        every = lambda: self.files  # noqa: E731 - a shuffled shard: any file may be the culprit
        self._drain(every)  # a previous pass stopped early
        self._left = self._reader_batches
        real = self.num_samples  # eval: real samples still to come; the reader's padding follows them
        for _ in range(self._steps - (self.start_batch if self.recipe.train else 0)):
            *views, y = self._run(every)
            n = self.batch_size if self.recipe.train else min(self.batch_size, real)  # train: full batches only
            real -= n
            images = [self._images(v[:n]) for v in views]
            extra = {"view": images[1]} if len(images) > 1 else {}
            yield Batch(images[0], self._labels(y[:n]), extra)
        self._drain(every)


class DaliPairLoader(_DaliLoaderBase):
    """CS-KD: the class-pair sampler orders a per-epoch file list, [anchors | partners (| anchors again)] per batch,
    read in order by a pipeline built for the epoch. Each group member is augmented independently, so the partner
    and (with data.extra_view) the second view get their own crops and flips. A resumed epoch continues with exactly
    the interrupted one's remaining batches; their crops differ (DALI's random streams cannot be fast-forwarded)."""

    def __init__(self, samples: list[tuple[str, int]], sampler: ClassPairBatchSampler, recipe: Recipe,
                 device: torch.device, extra_view: bool = False, seed: int = 0, threads: int = 2, prefetch: int = 2,
                 out_dtype: torch.dtype = torch.float32):
        if recipe.views != 1:
            raise ValueError("DaliPairLoader: the views come from the file list; use a Recipe with views=1")
        super().__init__([p for p, _ in samples], recipe, sampler.batch_size, device, threads, prefetch, seed,
                         sampler.rank, out_dtype, "class-pair train")
        self.labels = [y for _, y in samples]
        self.sampler = sampler
        self.groups = 3 if extra_view else 2  # anchors, partners[, second view of the anchors]
        self.num_samples = sampler.num_anchors

    def __len__(self) -> int:
        return len(self.sampler)

    def _epoch_list(self, batches: list[list[int]]) -> list[int]:
        b = self.batch_size
        order = []
        for idx in batches:
            half = len(idx) // 2
            anchors, partners = idx[:half], idx[half:]
            pad = [anchors[0]] * (b - half)  # a short last batch keeps the group layout; trimmed on output
            groups = [anchors + pad, partners + pad] + ([anchors + pad] if self.groups == 3 else [])
            order += [i for g in groups for i in g]
        return order

    def __iter__(self) -> Iterator[Batch]:
        batches = self.sampler.batches(self.epoch)[self.start_batch:]
        if not batches:
            return
        order = self._epoch_list(batches)
        self._build([self.files[i] for i in order], [self.labels[i] for i in order], self.groups * self.batch_size,
                    dali_seed(self.seed, self.rank, self.epoch, self.start_batch))
        self._left = len(batches)
        b = self.batch_size
        for k, idx in enumerate(batches):
            # The failing run may belong to a batch the pipeline prefetched ahead of batch k.
            window = lambda k=k: [self.files[i] for i in order[k * self.groups * b:  # noqa: E731
                                                                (k + 1 + self.prefetch) * self.groups * b]]
            img, y = self._run(window)
            n = len(idx) // 2
            images = self._images(img)
            extra = {"partner": images[b:b + n]}
            if self.groups == 3:
                extra["view"] = images[2 * b:2 * b + n]
            yield Batch(images[:n], self._labels(y[:n]), extra)
        self.close()  # the next epoch has another list


def torch_dtype(amp: str) -> tuple[bool, torch.dtype]:
    """(DALI writes fp16?, dtype handed to the model). DALI has no bfloat16 output: bf16 runs get fp16 from DALI
    (10 mantissa bits, more than bf16's 7, and the normalised range |x| < 3 is far from fp16's limits) cast to bf16
    on the device, one elementwise pass."""
    return {"fp32": (False, torch.float32), "fp16": (True, torch.float16), "bf16": (True, torch.bfloat16)}[amp]
