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
