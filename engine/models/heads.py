"""Exit heads of the two BYOT references. Each maps a stage output to (logits [B, K], pooled feature [B, D]).

- `BottleneckHead`: the ICCV-paper head as re-implemented by luanyunteng/pytorch-be-your-own-teacher
  (1x1 -> kxk stride k -> 1x1, each conv+BN+ReLU, GAP, FC; k = 8, 4, 2 after stages 0, 1, 2).
- `JournalHead`: the authors' journal-version head (ArchipLab-LinfengZhang/pytorch-self-distillation-final):
  a sigmoid attention map from a SepConv, then a chain of channel-doubling SepConvs down to the final width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    # bias=True as in the reference head; BN follows, so it is redundant but keeps the layout identical.
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, bias=True), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BottleneckHead(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, num_classes: int):
        super().__init__()
        mid = max(1, cout // 4)
        self.k = k
        self.body = nn.Sequential(_conv_bn_relu(cin, mid, 1, 1), _conv_bn_relu(mid, mid, k, k),
                                  _conv_bn_relu(mid, cout, 1, 1))
        self.fc = nn.Linear(cout, num_classes)
        self.out_features = cout

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] < self.k or x.shape[-2] < self.k:
            raise ValueError(f"exit head with a {self.k}x{self.k} stride-{self.k} conv needs a feature map of at "
                             f"least {self.k}x{self.k}, got {tuple(x.shape[-2:])}: use larger images or a cifar stem")
        feat = torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)
        return self.fc(feat), feat


class SepConv(nn.Module):
    """Depthwise-separable conv pair, as in the journal code (DARTS-style)."""

    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.Conv2d(cin, cin, 1, bias=False),
            nn.BatchNorm2d(cin), nn.ReLU(inplace=False),
            nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class JournalHead(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.attention = nn.Sequential(SepConv(cin, cin), nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        chain, c = [], cin
        while c < cout:
            chain.append(SepConv(c, min(c * 2, cout)))
            c = min(c * 2, cout)
        self.scala = nn.Sequential(*chain)
        self.fc = nn.Linear(cout, num_classes)
        self.out_features = cout

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # The reference upsamples x2; interpolating to x's size is the same on even maps and also handles odd ones.
        att = torch.sigmoid(F.interpolate(self.attention(x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        feat = torch.flatten(F.adaptive_avg_pool2d(self.scala(att * x), 1), 1)
        return self.fc(feat), feat


def make_head(kind: str, cin: int, cout: int, downsample: int, num_classes: int) -> nn.Module:
    """The head on a feature map `downsample` times larger than the last stage's: the bottleneck head's kxk
    stride-k conv takes k = downsample (8, 4, 2 after stages 0-2 of a ResNet, as in the reference; 1 on a plain
    model such as ViT, whose levels share one resolution)."""
    if kind == "bottleneck":
        return BottleneckHead(cin, cout, max(1, downsample), num_classes)
    if kind == "journal":
        return JournalHead(cin, cout, num_classes)
    raise ValueError(f"unknown exit head {kind!r}; allowed: bottleneck, journal")
