"""What the data layer is given: the `data.*` options plus a few plain arguments, never the run's whole config; and
`data.dataset=synthetic` as the one way to ask for synthetic data."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from engine.cli import main
from engine.config import ConfigError, DataConfig, load_config
from engine.setup_run import data_from_config
from pipelines.factory import build_data
from pipelines.synthetic import SyntheticLoader
from tests.helpers import tiny_args

CPU = torch.device("cpu")


def _self_pairs(loader) -> int:
    batches = loader.pairs.batches(0)
    return sum(a == p for b in batches for a, p in zip(b[: len(b) // 2], b[len(b) // 2:], strict=True))


def test_data_layer_reads_only_the_data_options():
    # A bare namespace with the fields of `data.*` and nothing else: no model, precision or objective section.
    opts = SimpleNamespace(**dataclasses.asdict(DataConfig(dataset="digits", image_size=8, augment="none",
                                                           batch_size=16, sampler="class_pair")))
    counts = {}
    for allow in (True, False):
        data = build_data(opts, CPU, seed=3, num_classes=10, in_chans=1, allow_self_partner=allow)
        assert data.num_classes == 10 and data.in_chans == 1
        counts[allow] = _self_pairs(data.train)
    # ~1,440 anchors in classes of ~144: about 10 anchors draw themselves when allowed, none when not
    assert counts[True] > 0 and counts[False] == 0


@pytest.mark.parametrize("allow", [True, False])
def test_engine_passes_the_cskd_partner_option(allow):
    cfg = load_config(None, ["data.dataset=digits", "data.image_size=8", "data.augment=none", "data.batch_size=16",
                             "data.sampler=class_pair", "model.num_classes=10", "model.in_chans=1",
                             f"objective.cskd.allow_self_partner={str(allow).lower()}"])
    assert (_self_pairs(data_from_config(cfg, CPU).train) > 0) == allow


@pytest.mark.parametrize("backend", ["torch", "dali", "dali-cpu"])
def test_synthetic_dataset_whatever_the_backend(backend):
    # On this CPU-only machine `dali` would refuse to build (it decodes on the GPU): synthetic data needs no loader.
    cfg = load_config(None, ["data.dataset=synthetic", f"data.backend={backend}", "data.image_size=16",
                             "data.batch_size=4", "data.limit_train=12", "model.num_classes=7", "model.in_chans=2",
                             "precision.channels_last=true"])
    data = data_from_config(cfg, CPU)
    assert isinstance(data.train, SyntheticLoader) and len(data.train) == 3 and data.test is None
    assert (data.num_classes, data.in_chans) == (7, 2)
    batch = next(iter(data.train))
    assert batch.images.shape == (4, 2, 16, 16) and batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.min() >= 0 and batch.labels.max() < 7


def test_synthetic_is_not_a_backend():
    with pytest.raises(ConfigError, match=r"data\.backend: 'synthetic' is not allowed; allowed values: .*dali-cpu"):
        load_config(None, ["data.backend=synthetic"])


def test_a_data_option_error_is_a_config_error_on_the_command_line(tmp_path, capsys):
    assert main(["train", *tiny_args(tmp_path, "data.backend=dali-cpu")]) == 2
    assert capsys.readouterr().err.startswith("config error: data.backend=dali-cpu reads image folders, but "
                                              "data.dataset=digits")


def _digits(run_seed: int = 0, **kw):
    opts = dataclasses.asdict(DataConfig(dataset="digits", image_size=8, augment="none", batch_size=10,
                                         val_split=200))
    return build_data(SimpleNamespace(**{**opts, **kw}), CPU, seed=run_seed, num_classes=10, in_chans=1)


def test_balanced_subset_takes_the_same_number_of_each_class():
    data = _digits(limit_train=300, balanced_subset=True)
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [30] * 10
    plain = _digits(limit_train=300)
    assert torch.bincount(plain.train.labels, minlength=10).tolist() != [30] * 10  # the first 300 are not balanced
    with pytest.raises(Exception, match="data.limit_train=305 is not a multiple of the 10 classes"):
        _digits(limit_train=305, balanced_subset=True)


def test_label_noise_moves_exactly_that_share_to_other_classes_and_leaves_eval_clean():
    clean, noisy = _digits(limit_train=1000, balanced_subset=True), _digits(limit_train=1000, balanced_subset=True,
                                                                           label_noise=0.3)
    assert torch.equal(clean.train.images, noisy.train.images)
    changed = clean.train.labels != noisy.train.labels
    assert changed.sum().item() == 300  # moved labels always land on another class, so exactly 30 % differ
    moved_to = noisy.train.labels[changed]
    assert torch.bincount(moved_to, minlength=10).min() > 10  # spread over the classes, not one target
    assert torch.equal(clean.val.labels, noisy.val.labels) and torch.equal(clean.test.labels, noisy.test.labels)
    again = _digits(limit_train=1000, balanced_subset=True, label_noise=0.3)
    assert torch.equal(again.train.labels, noisy.train.labels)  # seed-fixed


def test_split_seed_fixes_the_data_while_the_run_seed_changes():
    a = _digits(limit_train=300, balanced_subset=True, split_seed=5, label_noise=0.2, run_seed=0)
    b = _digits(limit_train=300, balanced_subset=True, split_seed=5, label_noise=0.2, run_seed=1)
    c = _digits(limit_train=300, balanced_subset=True, label_noise=0.2, run_seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)  # without split_seed the run's seed carves


def test_subset_and_noise_refuse_other_datasets():
    opts = dataclasses.asdict(DataConfig(dataset="synthetic", label_noise=0.2))
    with pytest.raises(Exception, match="data.balanced_subset and data.label_noise need"):
        build_data(SimpleNamespace(**opts), CPU, seed=0, num_classes=10, in_chans=1)


def test_a_folder_limit_spreads_over_the_classes():
    """A folder lists its files class after class: N of them are taken from every class in turn, not the first N
    (which would be the first few classes), and stay in the folder's order."""
    from pipelines.folder_splits import _limit

    files = [(f"c{y}/{i}.png", y) for y, n in ((0, 6), (1, 2), (2, 5)) for i in range(n)]
    kept = _limit(files, 7)
    assert sorted(y for _, y in kept) == [0, 0, 0, 1, 1, 2, 2]  # 3 rounds of 3 classes, class 1 runs out after 2
    assert kept == [f for f in files if f in kept] and [f for f, _ in kept][:3] == ["c0/0.png", "c0/1.png", "c0/2.png"]
    assert _limit(files, 4) == [files[0], files[1], files[6], files[8]]  # one of each, then class 0 again
    assert _limit(files, 0) == files and _limit(files, 99) == files and _limit(None, 3) is None
