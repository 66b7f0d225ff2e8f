import pytest
import torch

from engine.config import load_config
from engine.models import MultiExitModel, create_backbone, create_model
from engine.models.timm_backbone import TimmBackbone

# Standard figures of torchvision's ResNets (parameters; state-dict entries incl. num_batches_tracked).
STANDARD = {"resnet18": (11_689_512, 122), "resnet34": (21_797_672, 218), "resnet50": (25_557_032, 320),
            "resnet101": (44_549_160, 626)}


def _cfg(*ov):
    return load_config(None, list(ov))


@pytest.mark.parametrize("name", sorted(STANDARD))
def test_imagenet_resnet_matches_standard_layout(name):
    m = create_backbone(_cfg(f"model.name={name}").model)
    params, entries = STANDARD[name]
    assert sum(p.numel() for p in m.parameters()) == params
    sd = m.state_dict()
    assert len(sd) == entries
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight", "fc.weight", "fc.bias"} <= set(sd)


@pytest.mark.parametrize("stem, head, name, size", [
    ("cifar", "bottleneck", "resnet18", 32), ("imagenet", "bottleneck", "resnet50", 64),
    ("cifar", "journal", "resnet18", 32), ("cifar", "bottleneck", "preact_resnet18", 32),
])
def test_exit_shapes_match_metadata(stem, head, name, size):
    cfg = _cfg(f"model.name={name}", f"model.stem={stem}", "model.width=0.25", "model.depths=[1,1,1,1]",
               "model.num_classes=7", f"exits.head={head}")
    m = create_model(cfg.model, cfg.exits).eval()
    x = torch.randn(2, 3, size, size)
    out = m(x)
    assert m.num_exits == len(out.logits) == len(out.features) == 4
    _, stages = m.backbone.forward_intermediates(x)
    for info, z, f in zip(m.exit_info, out.logits, out.features):
        s = stages[info["stage"] - 1]
        assert s.shape[1] == info["num_chs"]
        assert s.shape[-1] == size // info["reduction"]
        assert z.shape == (2, 7) and f.shape == (2, info["feature_dim"])
    assert [i["stage"] for i in m.exit_info] == [1, 2, 3, 4]


def test_plain_model_equals_wrapper_without_exits():
    torch.manual_seed(0)
    cfg = _cfg("model.stem=cifar", "model.width=0.25", "model.num_classes=10", "exits.stages=[]")
    m = create_model(cfg.model, cfg.exits).eval()
    x = torch.randn(3, 3, 32, 32)
    out = m(x)
    assert len(out.logits) == 1
    torch.testing.assert_close(out.logits[0], m.backbone(x), rtol=0, atol=0)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in m.backbone.parameters())


def test_exits_do_not_change_the_backbone_path():
    torch.manual_seed(0)
    cfg = _cfg("model.stem=cifar", "model.width=0.25", "model.num_classes=10")
    m = create_model(cfg.model, cfg.exits).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x).logits[-1], m.backbone(x), rtol=0, atol=0)
    torch.testing.assert_close(m(x).features[-1], m.backbone.forward_head(m.backbone.forward_features(x), True))


def test_hint_adapter_and_exit_subset():
    cfg = _cfg("model.stem=cifar", "model.width=0.25", "exits.stages=[2,3]", "exits.hint_adapter=true")
    m = create_model(cfg.model, cfg.exits)
    out = m(torch.randn(2, 3, 32, 32))
    assert m.num_exits == 3 and [i["stage"] for i in m.exit_info] == [2, 3, 4]
    assert all(f.shape == (2, m.backbone.num_features) for f in out.features)
    assert len(m.adapters) == 2


def test_forward_intermediates_timm_semantics():
    m = create_backbone(_cfg("model.stem=cifar", "model.width=0.25").model).eval()
    x = torch.randn(1, 3, 32, 32)
    final, inter = m.forward_intermediates(x)
    assert len(inter) == 4
    torch.testing.assert_close(final, m.forward_features(x))
    assert len(m.forward_intermediates(x, indices=2)[1]) == 2  # int = last n
    only = m.forward_intermediates(x, indices=[-1], intermediates_only=True)
    torch.testing.assert_close(only[0], inter[3])


def test_timm_adapter_contract():
    """The timm path relies only on the timm contract; our ResNet honours it, so it stands in for a timm model."""
    torch.manual_seed(0)
    inner = create_backbone(_cfg("model.stem=cifar", "model.width=0.25", "model.num_classes=5").model)
    m = MultiExitModel(TimmBackbone(inner), [1, 2, 3]).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    torch.testing.assert_close(out.logits[-1], inner(x))
    assert [i["num_chs"] for i in m.exit_info] == [d["num_chs"] for d in inner.feature_info]


def test_small_images_give_a_clear_error():
    cfg = _cfg("model.stem=imagenet", "model.width=0.25")
    m = create_model(cfg.model, cfg.exits)
    with pytest.raises(ValueError, match="feature map of at least"):
        m(torch.randn(2, 3, 16, 16))
