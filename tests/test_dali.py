"""DALI backend on the CPU (device_id=None): layout, labels, exact values, sharding, pairs, bad input, training.

The GPU (mixed decode) path cannot run here; its graph differs only in the decoder's device and arguments.
"""
from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import load_config
from engine.setup_run import data_from_config
from pipelines.base import Loader
from pipelines.batch import DataConfigError, DataError
from pipelines.dali_loader import DaliFolderLoader, dali_batches_per_epoch
from pipelines.dali_pipes import Recipe, _decoder_args, image_pipeline
from pipelines.datasets import scan_image_folder
from pipelines.folder_splits import folder_splits
from pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, center_crop_box
from tests.photo_folder import write_photo_folder

CPU = torch.device("cpu")
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    # 21 train images (odd: the two train shards differ in size), 15 val (odd: the val shards too).
    return write_photo_folder(tmp_path_factory.mktemp("photos"), {"train": 7, "val": 5})


def _cfg(root: Path, *overrides: str):
    base = [f"data.root={root}", "data.dataset=imagefolder", "data.backend=dali-cpu", "data.image_size=32",
            "data.batch_size=4", "data.eval_batch_size=4", "data.workers=1", "model.num_classes=3"]
    return load_config(None, base + list(overrides))


def _fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha1(x.float().contiguous().numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------ layout, dtype, labels


@pytest.mark.parametrize("amp,dtype", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_shapes_dtype_channels_last_and_eval_labels(photos, amp, dtype):
    data = data_from_config(_cfg(photos, f"precision.amp={amp}", "precision.channels_last=true"), CPU)
    assert isinstance(data.train, Loader) and data.class_names == ["astronaut", "chelsea", "coffee"]
    batch = next(iter(data.train))
    assert batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == dtype
    assert batch.images.is_contiguous(memory_format=torch.channels_last)  # an NHWC buffer, viewed as NCHW
    assert batch.labels.dtype == torch.int64
    labels = torch.cat([b.labels for b in data.val])
    expected = [y for _, y in scan_image_folder(photos / "val")[0]]
    assert labels.tolist() == expected  # every file's label, in the file order
    assert data.val.num_samples == 15 and len(data.val) == 4


def test_channels_last_off_gives_contiguous_nchw(photos):
    batch = next(iter(data_from_config(_cfg(photos), CPU).train))
    assert batch.images.is_contiguous() and batch.images.shape == (4, 3, 32, 32)


def test_yielded_batches_stay_valid(photos):
    # Zero-copy outputs: a batch kept while later ones are produced (prefetch depth 2) must not change.
    loader = data_from_config(_cfg(photos, "data.dali_prefetch=2"), CPU).val
    kept, copies = [], []
    for b in loader:
        kept.append(b.images)
        copies.append(b.images.clone())
    assert all(torch.equal(k, c) for k, c in zip(kept, copies, strict=True))


def test_train_labels_match_every_file(photos):
    samples, _ = scan_image_folder(photos / "train")
    label_of = dict(samples)
    recipe = Recipe(32, "random_resized_crop", True, False, IMAGENET_MEAN, IMAGENET_STD, fp16=False,
                    channels_last=True)
    pipe = image_pipeline([p for p, _ in samples], [y for _, y in samples], recipe, batch_size=5, num_threads=1,
                          device_id=None, seed=1, shuffle=True, shuffle_seed=2)
    pipe.build()
    seen = []
    for _ in range(dali_batches_per_epoch(len(samples), 1, 5)):
        images, labels = pipe.run()
        for i in range(len(labels)):
            path = images[i].source_info()
            assert int(np.asarray(labels[i])[0]) == label_of[path], path
            seen.append(path)
    assert set(seen) == set(label_of)


def test_eval_values_equal_numpy_reference(tmp_path):
    # PNG (lossless) and a shorter side of 48: the 0.875 centre crop is exactly 42 px, so no resampling happens
    # and the output must equal crop -> /255 -> (x - mean) / std computed in NumPy.
    root = write_photo_folder(tmp_path, {"train": 1, "val": 3}, fmt="png", min_side=48, max_side=48)
    data = data_from_config(_cfg(root, "data.image_size=42", "precision.channels_last=true"), CPU)
    out = torch.cat([b.images for b in data.val])
    for (path, _), got in zip(scan_image_folder(root / "val")[0], out, strict=True):
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        left, top, right, bottom = center_crop_box(img.shape[1], img.shape[0])
        assert (right - left, bottom - top) == (42, 42)
        ref = (img[top:bottom, left:right] / 255.0 - MEAN) / STD
        np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_crop_flip_recipe_is_a_pad4_shift_and_flip(photos):
    # 32-px recipe: every training image is its file's resized image, zero-padded by 4, shifted by (dy, dx) in
    # [-4, 4]^2 and maybe mirrored; found by trying all files, shifts and flips.
    cfg = _cfg(photos, "data.augment=crop_flip")
    train = folder_splits(cfg.data, cfg.seed, cfg.model.in_chans).train
    plain = Recipe(32, "crop_flip", False, False, IMAGENET_MEAN, IMAGENET_STD, fp16=False, channels_last=False)
    resized = torch.cat([b.images for b in DaliFolderLoader(train, plain, 4, CPU, threads=1)])  # [21, 3, 32, 32]
    zero = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1).float()
    padded = zero.expand(len(train), 3, 40, 40).clone()
    padded[:, :, 4:36, 4:36] = resized
    candidates = torch.stack([w for dy in range(9) for dx in range(9) for w in
                              (padded[:, :, dy:dy + 32, dx:dx + 32], padded[:, :, dy:dy + 32, dx:dx + 32].flip(-1))])
    candidates = candidates.flatten(0, 1)  # [81 * 2 * 21, 3, 32, 32]
    batch = next(iter(data_from_config(cfg, CPU).train))
    for img, label in zip(batch.images, batch.labels, strict=True):
        err = (candidates - img).abs().flatten(1).amax(1)
        match = int(err.argmin())
        assert err[match] < 1e-4 and train[match % len(train)][1] == label


def test_eval_matches_torch_backend_on_jpegs(photos):
    # General sizes: crop + antialiased resize. DALI and PIL differ only by JPEG decoding and resampling rounding.
    dali = torch.cat([b.images for b in data_from_config(_cfg(photos), CPU).val])
    ref = torch.cat([b.images for b in data_from_config(_cfg(photos, "data.backend=torch", "data.workers=0"), CPU).val])
    diff = (dali - ref).abs()
    assert diff.mean() < 0.02 and diff.flatten().quantile(0.99) < 0.15  # one grey level is 0.017 here


# ------------------------------------------------------------------------------------------------ sharding


def test_two_shard_eval_covers_every_sample_once(photos):
    whole = [_fingerprint(x) for b in data_from_config(_cfg(photos), CPU).val for x in b.images]
    parts = [data_from_config(_cfg(photos), CPU, rank=r, world=2).val for r in range(2)]
    got = [[_fingerprint(x) for b in p for x in b.images] for p in parts]
    assert [p.num_samples for p in parts] == [8, 7] and [len(g) for g in got] == [8, 7]
    assert Counter(got[0] + got[1]) == Counter(whole) and len(set(whole)) == 15
    again = [_fingerprint(x) for b in parts[1] for x in b.images]  # a second pass: same samples, no leftovers
    assert again == got[1]


def test_train_shards_disjoint_within_epoch_and_equal_steps(photos):
    cfg = _cfg(photos, "data.augment=none")  # deterministic images, so each can be traced back to its file
    train = folder_splits(cfg.data, cfg.seed, cfg.model.in_chans).train
    plain = Recipe(32, "none", False, False, IMAGENET_MEAN, IMAGENET_STD, fp16=False, channels_last=False)
    names = {_fingerprint(x): p for (p, _), x in zip(
        train, torch.cat([b.images for b in DaliFolderLoader(train, plain, 4, CPU, threads=1)]), strict=True)}
    ranks = [data_from_config(cfg, CPU, rank=r, world=2).train for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]  # shards of 10 and 11 -> 2 full batches on both ranks
    orders = []
    for epoch in range(3):
        seen = []
        for r in ranks:
            r.set_epoch(epoch)
            seen.append([names[_fingerprint(x)] for b in r for x in b.images])
        assert [len(s) for s in seen] == [8, 8]
        assert len(set(seen[0] + seen[1])) == 16  # no file twice in an epoch, across or within ranks
        orders.append(seen[0] + seen[1])
    assert orders[0] != orders[1]  # reshuffled every epoch


def _run_labels(pipe) -> list[int]:
    return np.asarray(pipe.run()[1].as_tensor()).ravel().tolist()


def test_dali_shard_arithmetic_matches_reader(photos):
    # The loader's epoch arithmetic against the reader itself: 21 files, 2 shards, batch 4.
    samples, _ = scan_image_folder(photos / "train")
    recipe = Recipe(8, "none", False, False, IMAGENET_MEAN, IMAGENET_STD, fp16=False, channels_last=False)
    for shard in range(2):
        pipe = image_pipeline([p for p, _ in samples], list(range(21)), recipe, batch_size=4, num_threads=1,
                              device_id=None, seed=0, shard_id=shard, num_shards=2, shuffle=False)
        pipe.build()
        lo, hi = shard * 21 // 2, (shard + 1) * 21 // 2  # the reader's shard of 21 files
        got = [v for _ in range(dali_batches_per_epoch(21, 2, 4)) for v in _run_labels(pipe)]
        assert got[:hi - lo] == list(range(lo, hi)) and set(got[hi - lo:]) <= {hi - 1}  # then padding
        assert _run_labels(pipe)[0] == lo  # the next epoch starts on time


def test_resume_mid_epoch_and_abandoned_pass(photos):
    loader = data_from_config(_cfg(photos), CPU).train
    assert len(loader) == 5
    loader.set_epoch(0, start_batch=2)
    assert sum(1 for _ in loader) == 3
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    del it  # pass abandoned after one batch
    loader.set_epoch(2)
    assert sum(len(b) for b in loader) == 20


# --------------------------------------------------------------------------------------------------- pairs


def _class_by_colour(x: torch.Tensor) -> torch.Tensor:
    pixels = x.float() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return pixels.mean(dim=(2, 3)).argmax(1)


def _differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).amax(1) > 0.1


def test_pair_batches_share_class_and_augment_independently(tmp_path):
    root = write_photo_folder(tmp_path, {"train": 6, "val": 1}, tint=True)  # class c lives in colour channel c
    cfg = _cfg(root, "data.sampler=class_pair", "data.extra_view=true", "objective.cskd.allow_self_partner=false",
               "data.batch_size=5")
    data = data_from_config(cfg, CPU)
    sampler = data.train.sampler
    assert len(data.train) == 4  # 18 anchors, B = 5: ceil(18/5) batches, the last of 3 (the official sampler)
    for epoch in range(2):
        data.train.set_epoch(epoch)
        batches = list(data.train)
        assert len(batches) == 4
        assert sorted(i for idx in sampler.batches(epoch) for i in idx[: len(idx) // 2]) == list(range(18))
        for b, idx in zip(batches, sampler.batches(epoch), strict=True):
            partner, view = b.extra["partner"], b.extra["view"]
            assert partner.shape == view.shape == b.images.shape == (len(idx) // 2, 3, 32, 32)
            assert b.labels.tolist() == [sampler.labels[i].item() for i in idx[: len(idx) // 2]]
            assert _class_by_colour(b.images).tolist() == b.labels.tolist()
            assert _class_by_colour(partner).tolist() == b.labels.tolist()
            assert _class_by_colour(view).tolist() == b.labels.tolist()
            assert _differ(b.images, partner).all() and _differ(b.images, view).all()


def test_extra_view_without_pairs(photos):
    batch = next(iter(data_from_config(_cfg(photos, "data.extra_view=true"), CPU).train))
    assert batch.extra["view"].shape == batch.images.shape
    assert _differ(batch.images, batch.extra["view"]).all()


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def broken(photos, tmp_path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(photos, root)
    victim = root / "train" / "chelsea" / "003.jpg"
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    return root


def test_corrupt_jpeg_names_the_file(broken):
    data = data_from_config(_cfg(broken), CPU)
    with pytest.raises(DataError, match=r"train/chelsea/003\.jpg.*skip_corrupt"):
        for epoch in range(2):
            data.train.set_epoch(epoch)
            for _ in data.train:
                pass


def test_corrupt_jpeg_skipped_and_counted(broken):
    data = data_from_config(_cfg(broken, "data.skip_corrupt=true"), CPU)
    assert data.train.skipped == 1 and data.train.num_samples == 20
    assert sum(len(b) for b in data.train) == 20


def test_non_image_with_jpeg_name_is_named(photos, tmp_path):
    root = tmp_path / "junk"
    shutil.copytree(photos, root)
    (root / "val" / "coffee" / "002.jpg").write_text("this is not an image")
    data = data_from_config(_cfg(root), CPU)
    with pytest.raises(DataError, match=r"val/coffee/002\.jpg"):
        list(data.val)


def test_empty_class_folder_and_missing_root(photos, tmp_path):
    root = tmp_path / "empty"
    shutil.copytree(photos, root)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match=r"train/zebra"):
        data_from_config(_cfg(root), CPU)
    with pytest.raises(DataError, match="nowhere"):
        data_from_config(_cfg(tmp_path / "nowhere"), CPU)


def test_config_errors():
    with pytest.raises(DataConfigError, match="data.backend=dali-cpu"):
        data_from_config(load_config(None, ["data.backend=dali-cpu", "data.dataset=fashion_mnist"]), CPU)
    with pytest.raises(DataConfigError, match="dali-cpu"):
        data_from_config(load_config(None, ["data.backend=dali", "data.dataset=imagefolder", "data.root=/x"]), CPU)


def test_mixed_decoder_arguments():
    # Cannot run without a GPU; at least the configuration reaching nvJPEG is what the config says.
    r = Recipe(224, "random_resized_crop", True, False, IMAGENET_MEAN, IMAGENET_STD, fp16=True, channels_last=True,
               decoder="mixed", hw_decoder_load=0.9)
    args = _decoder_args(r)
    assert args["device"] == "mixed" and args["hw_decoder_load"] == 0.9 and args["device_memory_padding"] > 0
    assert "hw_decoder_load" not in _decoder_args(Recipe(**{**r.__dict__, "decoder": "cpu"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed (GPU) decoding needs CUDA")
def test_mixed_decode_on_gpu_matches_cpu(photos):
    gpu = torch.device("cuda")
    args = ("precision.amp=fp16", "precision.channels_last=true")
    data = data_from_config(_cfg(photos, "data.backend=dali", *args), gpu)
    batch = next(iter(data.train))
    assert batch.images.device.type == "cuda" and batch.images.dtype == torch.float16
    assert batch.images.is_contiguous(memory_format=torch.channels_last) and batch.labels.device.type == "cuda"
    on_gpu = torch.cat([b.images.float().cpu() for b in data.val])
    on_cpu = torch.cat([b.images.float() for b in data_from_config(_cfg(photos, *args), CPU).val])
    assert (on_gpu - on_cpu).abs().mean() < 0.03  # nvJPEG vs libjpeg-turbo: rounding-level differences


def test_same_splits_as_torch_backend(photos):
    cfg = _cfg(photos, "data.val_split=4", "data.limit_eval=3", "data.backend=torch")
    torch_data = data_from_config(cfg, CPU)
    ours = folder_splits(cfg.data, cfg.seed, cfg.model.in_chans)
    assert torch_data.train.dataset.samples == ours.train
    assert torch_data.val.dataset.samples == ours.val and torch_data.test.dataset.samples == ours.test


# ------------------------------------------------------------------------------------------------ training


def test_backend_switch_trains_to_comparable_accuracy(tmp_path, one_thread):
    from engine.train import train
    from pipelines.datasets import FASHION_MNIST_DIR
    from pipelines.prepare import main as prepare

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"Fashion-MNIST IDX files not installed ({FASHION_MNIST_DIR})")
    root = tmp_path / "fmnist"
    assert prepare(["fashion-mnist", "--out", str(root), "--val", "100", "--limit-train", "500",
                    "--limit-test", "200"]) == 0
    top1 = {}
    for backend in ("torch", "dali-cpu"):
        cfg = load_config(None, [
            f"data.root={root}", "data.dataset=imagefolder", f"data.backend={backend}", "data.image_size=16",
            "data.augment=none", "data.batch_size=25", "data.eval_batch_size=100", "data.workers=1",
            "model.in_chans=1", "model.num_classes=10", "model.stem=cifar", "model.width=0.25",
            "model.depths=[1,1,1,1]", "exits.stages=[]", "objective.name=ce", "optim.name=adamw", "optim.lr=0.003",
            "optim.weight_decay=0", "schedule.epochs=4", "schedule.name=cosine", "logging.progress=false",
            f"checkpoint.dir={tmp_path / backend}"])
        summary = train(cfg, device="cpu")
        top1[backend] = summary["test_last"]["exit0"]["top1"]
    # 200 test images: one run's top-1 has a binomial std of ~3 points; chance is 10 %.
    assert min(top1.values()) > 60, top1
    assert abs(top1["torch"] - top1["dali-cpu"]) <= 12, top1
