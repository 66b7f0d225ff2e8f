"""The timm adapter (engine/models/timm_backbone.py) against a stand-in `timm` module with timm's model contract
(`feature_info`, `forward_intermediates`, `forward_head(pre_logits=...)`, `head_hidden_size`), so each rule is
checked on shapes chosen to tell it apart; tests/test_timm.py runs real timm models."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from engine.config import ConfigError
from engine.models import create_model
from engine.objectives import build_objective
from engine.types import Batch
from tests.helpers import tiny_config


class FakeTimmModel(nn.Module):
    """`levels` feature levels of (channels, reduction); a head with a hidden layer after pooling, like MobileNetV3
    (num_features 12, head_hidden_size 20), unless `hidden` is 0."""

    def __init__(self, levels, num_classes=10, hidden=20, in_chans=1, **kw):
        super().__init__()
        self.feature_info = [{"num_chs": c, "reduction": r, "module": f"l{i}"} for i, (c, r) in enumerate(levels)]
        self.blocks = nn.ModuleList()
        prev, prev_r = in_chans, 1
        for c, r in levels:
            self.blocks.append(nn.Conv2d(prev, c, 3, stride=r // prev_r, padding=1))
            prev, prev_r = c, r
        self.num_features, self.num_classes = prev, num_classes
        self.head_hidden_size = hidden or prev
        self.hidden = nn.Linear(prev, hidden) if hidden else nn.Identity()
        self.fc = nn.Linear(self.head_hidden_size, num_classes)
        self.asked: list = []

    def forward_intermediates(self, x, indices):
        self.asked.append(list(indices))
        inters = []
        for i, b in enumerate(self.blocks):
            x = torch.relu(b(x))
            if i in indices:
                inters.append(x)
        return x, inters

    def forward_features(self, x):
        return self.forward_intermediates(x, [])[0]

    def forward_head(self, x, pre_logits=False):
        x = self.hidden(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.fixture
def fake_timm(monkeypatch):
    made = {}

    def create_model(name, pretrained=False, pretrained_cfg_overlay=None, drop_rate=0.0, **kw):
        levels = {"mobile": [(4, 2), (6, 4), (8, 8), (10, 16), (12, 32)],  # stem + 4 stages, hidden head
                  "vit": [(8, 4)] * 12}[name]  # 12 blocks at one resolution
        model = FakeTimmModel(levels, hidden=20 if name == "mobile" else 0, **kw)
        made[name] = dict(model=model, pretrained=pretrained, overlay=pretrained_cfg_overlay)
        return model
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    return made


def test_a_head_hidden_layer_sizes_the_deepest_feature_and_byot_runs(tmp_path, fake_timm):
    cfg = tiny_config(tmp_path, "model.name=timm:mobile", "model.in_chans=1", "exits.stages=[0,1,2]",
                      "objective.name=byot", "objective.backend=torch")
    model = create_model(cfg.model, cfg.exits)
    assert model.backbone.num_features == 20  # head_hidden_size, what forward_head(pre_logits=True) returns
    objective = build_objective(cfg, model.num_exits, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    loss, out = objective(model, Batch(torch.randn(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,))))
    loss.total.backward()  # the hint compares every exit's feature with the 20-wide deepest one
    assert [f.shape[1] for f in out.features] == [20] * 4 and "hint_0" in loss.terms
    assert fake_timm["mobile"]["model"].asked[-1] == [1, 2, 3]  # stages 0-2 skip the stem level


def test_a_plain_models_stages_are_the_quarters_of_its_depth(tmp_path, fake_timm):
    cfg = tiny_config(tmp_path, "model.name=timm:vit", "model.in_chans=1", "exits.stages=[0,1,2]",
                      "objective.name=dsn", "objective.backend=torch")
    model = create_model(cfg.model, cfg.exits)
    model(torch.randn(2, 1, 32, 32))
    assert fake_timm["vit"]["model"].asked[-1] == [2, 5, 8]  # blocks 3, 6 and 9 of 12; the deepest exit ends at 12
    assert model.backbone.levels == [2, 5, 8, 11]


def test_a_local_weights_file_is_passed_to_timm_and_a_missing_one_is_a_config_error(tmp_path, fake_timm):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    cfg = tiny_config(tmp_path, "model.name=timm:mobile", "model.in_chans=1", f"model.pretrained_file={weights}")
    create_model(cfg.model, cfg.exits)
    assert fake_timm["mobile"]["pretrained"] and fake_timm["mobile"]["overlay"] == {"file": str(weights)}
    cfg = tiny_config(tmp_path, "model.name=timm:mobile", "model.in_chans=1",
                      f"model.pretrained_file={tmp_path / 'none.bin'}")
    with pytest.raises(ConfigError, match="model.pretrained_file: .*none.bin does not exist"):
        create_model(cfg.model, cfg.exits)
