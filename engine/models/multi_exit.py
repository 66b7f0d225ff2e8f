"""MultiExitModel: a backbone plus exit heads after chosen stages, every exit from one forward pass, no hooks.

The backbone only needs the timm contract (`forward_intermediates`, `forward_head(x, pre_logits)`, `feature_info`,
`get_classifier`), so our ResNets and any timm model plug in the same way. With no exits it is exactly the backbone.
Stages are 0-based, as timm's `forward_intermediates` indices: exit i sits after stage `exit_stages[i]`, and the
deepest exit, the backbone's own head, after the last stage (`exit_info[i]["stage"]`).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from engine.models.heads import make_head
from engine.types import ExitOutputs


class MultiExitModel(nn.Module):
    def __init__(self, backbone: nn.Module, exit_stages: Sequence[int] = (0, 1, 2), head: str = "bottleneck",
                 hint_adapter: bool = False):
        super().__init__()
        self.backbone = backbone
        self.exit_stages = sorted(exit_stages)
        n_stages = len(backbone.feature_info)
        num_classes = backbone.num_classes
        final = backbone.num_features
        last = backbone.feature_info[-1]["reduction"]
        self.heads = nn.ModuleList(
            make_head(head, backbone.feature_info[s]["num_chs"], final, last // backbone.feature_info[s]["reduction"],
                      num_classes) for s in self.exit_stages)
        # Adapters are built eagerly (the journal code builds them lazily at step 1 and must rebuild its optimizer).
        self.adapters = nn.ModuleList(nn.Linear(h.out_features, final) for h in self.heads) if hint_adapter else None
        self.exit_info = [
            dict(stage=s, num_chs=backbone.feature_info[s]["num_chs"],
                 reduction=backbone.feature_info[s]["reduction"], feature_dim=final, num_classes=num_classes)
            for s in self.exit_stages
        ] + [dict(stage=n_stages - 1, num_chs=backbone.feature_info[-1]["num_chs"],
                  reduction=backbone.feature_info[-1]["reduction"], feature_dim=final, num_classes=num_classes)]

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    def forward(self, x: Tensor) -> ExitOutputs:
        final, inters = self.backbone.forward_intermediates(x, indices=self.exit_stages)
        logits, feats = [], []
        for i, (head, stage_out) in enumerate(zip(self.heads, inters)):
            z, f = head(stage_out)
            logits.append(z)
            feats.append(self.adapters[i](f) if self.adapters is not None else f)
        pooled = self.backbone.forward_head(final, pre_logits=True)
        logits.append(self.backbone.get_classifier()(pooled))
        feats.append(pooled)
        return ExitOutputs(logits, feats)
