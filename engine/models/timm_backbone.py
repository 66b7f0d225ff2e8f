"""Optional: any timm model with `forward_intermediates` as a multi-exit backbone (`model.name: timm:<name>`).

Stages 0..3 mean the same as for our ResNets: the depth's quarters. A hierarchical model (its feature levels
downsample) has a stage per resolution; timm counts the stem as a level for some families (ResNet: 5 levels), so
the last four are the stages. A plain model (ViT: one level per block, all at one resolution) has its stages at the
blocks ending each quarter of its depth (blocks 2, 5, 8, 11 of 12), as the papers place their exits.
The deepest exit's feature is the head's pre-logits output, whose width is `head_hidden_size` where a model has a
hidden head layer after pooling (MobileNetV3/V4, GhostNet: 1024 or 1280 against `num_features` 576 or 960).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

_TORCHVISION_SCHEMAS = None  # the Library must outlive the import: dropping it removes the schemas


class TimmBackbone(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates(); it cannot carry exits")
        self.model = model
        info = model.feature_info
        info = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        if len(info) < 4:
            raise ValueError(f"{type(model).__name__} exposes {len(info)} feature levels; exits need at least 4")
        n = len(info)
        plain = n > 5 and len({d.get("reduction") for d in info}) == 1
        self.levels = [round(n * (k + 1) / 4) - 1 for k in range(4)] if plain else list(range(n - 4, n))
        self.feature_info = [dict(info[i]) for i in self.levels]
        self.num_features = getattr(model, "head_hidden_size", None) or model.num_features
        self.num_classes = model.num_classes

    def forward_intermediates(self, x: Tensor, indices: Sequence[int] | None = None, stop_early: bool = False):
        idx = [self.levels[i % 4] for i in (range(4) if indices is None else indices)]
        if not idx:  # no exits: plain forward_features
            return self.model.forward_features(x), []
        if stop_early:  # timm stops early only when asked for the intermediates alone
            return None, self.model.forward_intermediates(x, indices=idx, stop_early=True, intermediates_only=True)
        return self.model.forward_intermediates(x, indices=idx)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def import_timm():
    """timm, or ImportError. timm imports torchvision, and a torchvision wheel built for CUDA beside a CPU torch
    (what pip picks for torch's CPU build: the CPU wheels are on PyTorch's own index only) cannot load its C++ ops,
    so its import dies registering fake kernels for `torchvision::nms`/`qnms`. Declaring those two schemas lets the
    Python side import; timm needs none of the C++ ops (torchvision.ops.nms itself still raises)."""
    try:
        import timm  # optional dependency: timm
        return timm
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]  # the half-imported modules
    global _TORCHVISION_SCHEMAS
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        if not _has_schema(f"torchvision::{op}"):
            _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm
    return timm


def _has_schema(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def create_timm_backbone(name: str, pretrained_file: str | None = None, **kw) -> TimmBackbone:
    try:
        timm = import_timm()
    except ImportError:
        raise ImportError(f"model.name 'timm:{name}' needs timm: pip install 'selfdistill[timm]'") from None
    if pretrained_file is None:
        return TimmBackbone(timm.create_model(name, pretrained=False, **kw))
    if not Path(pretrained_file).is_file():
        from engine.config import ConfigError  # models sit below the config; only this error needs it

        raise ConfigError(f"model.pretrained_file: {pretrained_file} does not exist")
    return TimmBackbone(timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": pretrained_file},
                                          **kw))
