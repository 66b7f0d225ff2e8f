"""Optional: any timm model with `forward_intermediates` as a multi-exit backbone (`model.name: timm:<name>`).

timm counts the stem as a feature level for some families (ResNet: 5 levels); exits address the last four
levels as stages 0..3, so the same `exits.stages` config means the same thing for our ResNets and timm's.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


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
        self.offset = len(info) - 4
        self.feature_info = [dict(d) for d in info[self.offset:]]
        self.num_features = model.num_features
        self.num_classes = model.num_classes

    def forward_intermediates(self, x: Tensor, indices: Sequence[int] | None = None):
        idx = [self.offset + (i % 4) for i in (range(4) if indices is None else indices)]
        if not idx:  # no exits: plain forward_features
            return self.model.forward_features(x), []
        return self.model.forward_intermediates(x, indices=idx)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def create_timm_backbone(name: str, **kw) -> TimmBackbone:
    try:
        import timm  # optional dependency: timm
    except ImportError:
        raise ImportError(f"model.name 'timm:{name}' needs timm: pip install 'selfdistill[timm]'") from None
    return TimmBackbone(timm.create_model(name, pretrained=False, **kw))
