"""ResNet and PreAct ResNet backbones, written here so no torchvision is needed.

Two pre-activation networks that differ on purpose:
- `PreActBlock` in a ResNet with no BN after the stem and BN+ReLU after the last stage is the textbook PreAct
  ResNet (He et al. 2016, "Identity Mappings"): an identity shortcut adds x itself.
- `CSKDPreActBlock` in a ResNet with BN+ReLU after the stem and nothing after the last stage is CS-KD's
  `CIFAR_ResNet` (alinlab/cs-kd, models/resnet.py): its shortcut, an empty nn.Sequential when the shape is kept, is
  applied to relu(bn1(x)), so an identity block adds the pre-activated input. The block builds its 1x1 shortcut
  after its convolutions and the network keeps PyTorch's default initialisation, as the official code does, so the
  same seed gives the same initial weights.

Parameter names match torchvision's ResNet (conv1, bn1, layer1..4, fc; blocks conv1/bn1/conv2/bn2[/conv3/bn3],
downsample.0/1), so its state dicts load. Backbones follow the timm contract used by the exits:
`forward_intermediates`, `forward_head(x, pre_logits)` and `feature_info` (channels and stride per stage).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # stride on the 3x3 (ResNet v1.5, as torchvision)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): the identity shortcut adds x, a projection sees relu(bn1(x))."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + identity

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)


class CSKDPreActBlock(PreActBlock):
    """CS-KD's PreActBlock: both shortcuts (identity or 1x1 conv) take relu(bn1(x)); the block builds its own."""

    builds_shortcut = True

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__(cin, planes, stride)
        if stride != 1 or cin != planes:  # created after the convolutions: the official RNG order
            self.downsample = nn.Sequential(conv1x1(cin, planes, stride))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = out if self.downsample is None else self.downsample(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], layers: Sequence[int], num_classes: int = 1000, in_chans: int = 3,
                 stem: str = "imagenet", width: float = 1.0, zero_init_residual: bool = False,
                 drop_rate: float = 0.0, stem_norm: bool | None = None, final_norm: bool | None = None,
                 default_init: bool = False):
        """`stem_norm` / `final_norm`: BN+ReLU after the stem / after the last stage (default: the textbook
        placement for the block); `default_init`: keep PyTorch's initialisation instead of Kaiming fan-out."""
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.preact = issubclass(block, PreActBlock)
        stem_norm = not self.preact if stem_norm is None else stem_norm
        self.has_final_norm = self.preact if final_norm is None else final_norm
        base = max(1, int(round(64 * width)))
        self.inplanes = base
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, base, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
            stem_reduction = 4
        else:
            self.conv1 = conv3x3(in_chans, base)
            self.maxpool = nn.Identity()
            stem_reduction = 1
        self.bn1 = nn.BatchNorm2d(base) if stem_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if stem_norm else nn.Identity()
        self.layer1 = self._make_layer(block, base, layers[0], 1)
        self.layer2 = self._make_layer(block, base * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], 2)
        self.num_features = base * 8 * block.expansion
        self.final_norm = nn.BatchNorm2d(self.num_features) if self.has_final_norm else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.fc = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes
        self.feature_info = [
            dict(num_chs=base * (2 ** i) * block.expansion, reduction=stem_reduction * 2 ** i, module=f"layer{i + 1}")
            for i in range(4)
        ]
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not default_init:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if (stride != 1 or self.inplanes != planes * block.expansion) and not getattr(block, "builds_shortcut", False):
            conv = conv1x1(self.inplanes, planes * block.expansion, stride)
            downsample = nn.Sequential(conv) if self.preact else nn.Sequential(
                conv, nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              stop_early: bool = False, intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm semantics: indices None = all 4 stages, int n = last n, list = explicit (negatives allowed)."""
        if indices is None:
            take = list(range(4))
        elif isinstance(indices, int):
            take = list(range(4 - indices, 4))
        else:
            take = [i % 4 for i in indices]
        last = max(take) if (stop_early or intermediates_only) else 3
        x = self.forward_stem(x)
        inters = []
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                inters.append(x)
        if intermediates_only:
            return inters
        return self.final_norm_act(x), inters

    def final_norm_act(self, x: Tensor) -> Tensor:
        return F.relu(self.final_norm(x)) if self.has_final_norm else x

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_norm_act(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
