import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import load_config
from engine.models import MultiExitModel, create_backbone, create_model
from engine.models.resnet import CSKDPreActBlock, PreActBlock
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
    ("cifar", "journal", "cskd_preact_resnet18", 32),
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
        s = stages[info["stage"]]
        assert s.shape[1] == info["num_chs"]
        assert s.shape[-1] == size // info["reduction"]
        assert z.shape == (2, 7) and f.shape == (2, info["feature_dim"])
    assert [i["stage"] for i in m.exit_info] == [0, 1, 2, 3]


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
    cfg = _cfg("model.stem=cifar", "model.width=0.25", "exits.stages=[1,2]", "exits.hint_adapter=true")
    m = create_model(cfg.model, cfg.exits)
    out = m(torch.randn(2, 3, 32, 32))
    assert m.num_exits == 3 and [i["stage"] for i in m.exit_info] == [1, 2, 3]
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
    m = MultiExitModel(TimmBackbone(inner), [0, 1, 2]).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    torch.testing.assert_close(out.logits[-1], inner(x))
    assert [i["num_chs"] for i in m.exit_info] == [d["num_chs"] for d in inner.feature_info]


def test_small_images_give_a_clear_error():
    cfg = _cfg("model.stem=imagenet", "model.width=0.25")
    m = create_model(cfg.model, cfg.exits)
    with pytest.raises(ValueError, match="feature map of at least"):
        m(torch.randn(2, 3, 16, 16))


# ------------------------------------------------------------------- CS-KD's CIFAR_ResNet18, rebuilt from its source
# The structure of alinlab/cs-kd models/resnet.py (`PreActBlock`, `CIFAR_ResNet`), written out again here as the
# independent reference: stem conv3x3 + BN + ReLU, pre-activation blocks whose shortcut (empty nn.Sequential, or a
# 1x1 conv when the shape changes) is applied to relu(bn1(x)), no norm after layer4, 4x4 average pool, Linear
# with bias, PyTorch's default initialisation.
CSKD_PARAMS_100 = 11_217_444  # the official CIFAR_ResNet18 for 100 classes
TEXTBOOK_PARAMS_100 = 11_218_340  # He et al.'s placement: no stem BN (-128), BN after the last stage (+1024)


class _OfficialBlock(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + sc


class _OfficialCifarResNet(nn.Module):
    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layers = 64, []
        for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(_OfficialBlock(cin, planes, s))
                cin = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


def _ours_name(official: str) -> str:
    name = official.replace("shortcut.", "downsample.")
    return "fc." + name[len("linear."):] if name.startswith("linear.") else name


def _cskd_net(name="cskd_preact_resnet18"):
    return create_backbone(_cfg(f"model.name={name}", "model.stem=cifar", "model.num_classes=100").model)


def test_cskd_resnet18_same_parameters_and_init_as_the_official():
    torch.manual_seed(0)
    ref = _OfficialCifarResNet()
    torch.manual_seed(0)
    ours = _cskd_net()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ref) == count(ours) == CSKD_PARAMS_100
    assert count(_cskd_net("preact_resnet18")) == TEXTBOOK_PARAMS_100  # the textbook net is a different network
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert sorted(_ours_name(k) for k in theirs) == sorted(mine)
    for k, v in theirs.items():  # same seed -> the very same initial weights (creation order and init kept)
        torch.testing.assert_close(mine[_ours_name(k)], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("train", [False, True])
def test_cskd_resnet18_outputs_match_the_official_with_shared_weights(train):
    torch.manual_seed(1)
    ref = _OfficialCifarResNet().double()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters, so eval mode is tested too
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ours = _cskd_net().double()
    ours.load_state_dict({_ours_name(k): v for k, v in ref.state_dict().items()})
    ref.train(train)
    ours.train(train)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride, cin", [(1, 16), (2, 16), (1, 8)])
def test_cskd_block_matches_the_official_block(stride, cin):
    torch.manual_seed(2)
    ref = _OfficialBlock(cin, 16, stride).double().eval()
    ours = CSKDPreActBlock(cin, 16, stride).double().eval()
    ours.load_state_dict({_ours_name(k): v for k, v in ref.state_dict().items()})
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    if stride == 1 and cin == 16:  # the identity block is where the textbook block differs: it adds x itself
        textbook = PreActBlock(cin, 16, stride).double().eval()
        textbook.load_state_dict(ours.state_dict())
        assert (textbook(x) - ref(x)).abs().max() > 0.1
