"""Model registry: one small function per backbone variant, and `create_model` building the multi-exit model."""
from __future__ import annotations

from torch import nn

from engine.models.multi_exit import MultiExitModel
from engine.models.resnet import BasicBlock, Bottleneck, CSKDPreActBlock, PreActBlock, ResNet
from engine.models.timm_backbone import create_timm_backbone
from engine.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register

_DEPTHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3)),
           "preact_resnet18": (PreActBlock, (2, 2, 2, 2)), "cskd_preact_resnet18": (CSKDPreActBlock, (2, 2, 2, 2)),
           "cskd_preact_resnet34": (CSKDPreActBlock, (3, 4, 6, 3))}
# CS-KD's CIFAR_ResNet (alinlab/cs-kd): BN+ReLU after the stem, none after the last stage, PyTorch's default init.
_CSKD = dict(stem_norm=True, final_norm=False, default_init=True)


def _resnet(name: str, depths=None, **kw) -> ResNet:
    block, layers = _DEPTHS[name]
    return ResNet(block, depths or layers, **kw)


@register_model
def resnet18(**kw) -> ResNet:
    return _resnet("resnet18", **kw)


@register_model
def resnet34(**kw) -> ResNet:
    return _resnet("resnet34", **kw)


@register_model
def resnet50(**kw) -> ResNet:
    return _resnet("resnet50", **kw)


@register_model
def resnet101(**kw) -> ResNet:
    return _resnet("resnet101", **kw)


@register_model
def preact_resnet18(**kw) -> ResNet:
    """The textbook pre-activation ResNet-18 (He et al. 2016): no BN after the stem, BN+ReLU after the last stage."""
    return _resnet("preact_resnet18", **kw)


@register_model
def cskd_preact_resnet18(**kw) -> ResNet:
    """CS-KD's `CIFAR_ResNet18` exactly (11,217,444 parameters for 100 classes); use with stem='cifar'."""
    return _resnet("cskd_preact_resnet18", **_CSKD, **kw)


@register_model
def cskd_preact_resnet34(**kw) -> ResNet:
    """CS-KD's `CIFAR_ResNet34` (pre-activation blocks [3, 4, 6, 3]); use with stem='cifar'."""
    return _resnet("cskd_preact_resnet34", **_CSKD, **kw)


def check_model_name(name: str) -> None:
    """ConfigError for a model.name that is neither registered nor timm:<name>, before anything is built."""
    from engine.config import ConfigError

    if not name.startswith("timm:") and name not in MODELS.names():
        raise ConfigError(f"model.name: {name!r} is not a registered model; registered: {', '.join(MODELS.names())}"
                          ", or timm:<name> for a timm model (selfdistill train --list-models)")


def create_backbone(model_cfg) -> nn.Module:
    kw = dict(num_classes=model_cfg.num_classes, in_chans=model_cfg.in_chans)
    if model_cfg.name.startswith("timm:"):
        return create_timm_backbone(model_cfg.name[len("timm:"):], drop_rate=model_cfg.drop_rate,
                                    pretrained_file=model_cfg.pretrained_file, **kw,
                                    **({} if model_cfg.img_size is None else {"img_size": model_cfg.img_size}))
    factory = MODELS.get(model_cfg.name)
    return factory(stem=model_cfg.stem, width=model_cfg.width, depths=model_cfg.depths,
                   zero_init_residual=model_cfg.zero_init_residual, drop_rate=model_cfg.drop_rate, **kw)


def create_model(model_cfg, exits_cfg) -> MultiExitModel:
    return MultiExitModel(create_backbone(model_cfg), exits_cfg.stages, exits_cfg.head, exits_cfg.hint_adapter)
