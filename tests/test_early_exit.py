"""Truncated and early-exit forwards (engine/models/early_exit.py) against the training model's own exits."""
import pytest
import torch
import torch.nn.functional as F

from engine.config import load_config
from engine.models import create_model
from engine.models.early_exit import EarlyExitModel, TruncatedModel, exit_index_for_threshold, policy_curve
from engine.models.exit_flops import count_params

TINY = ["model.width=0.25", "model.depths=[1,1,1,1]", "model.num_classes=7"]
MODELS = {  # name -> (overrides, image size)
    "resnet18-cifar": (["model.stem=cifar"], 16),
    "resnet50-imagenet": (["model.name=resnet50", "model.stem=imagenet"], 64),
    "preact-journal": (["model.name=preact_resnet18", "model.stem=cifar", "exits.head=journal",
                        "exits.stages=[0,2]"], 16),
    "plain": (["model.stem=cifar", "exits.stages=[]"], 16),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str):
    overrides, size = MODELS[name]
    torch.manual_seed(0)
    cfg = load_config(None, TINY + overrides)
    model = create_model(cfg.model, cfg.exits).eval()
    # Sharpen the random heads so the max-softmax spreads over (0, 1) and thresholds split the batch.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(30)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS))
def test_truncated_model_equals_each_exit(name):
    model, x = _model(name)
    with torch.no_grad():
        ref = model(x).logits
        for k in range(model.num_exits):
            torch.testing.assert_close(TruncatedModel(model, k).eval()(x), ref[k], rtol=0, atol=0)
        torch.testing.assert_close(TruncatedModel(model, -1)(x), ref[-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        TruncatedModel(model, model.num_exits)


def test_truncated_model_holds_only_what_it_runs():
    model, _ = _model("resnet18-cifar")
    full = TruncatedModel(model, -1)
    assert count_params(full) == count_params(model.backbone)  # no exit head in the single-exit network
    first = TruncatedModel(model, 0)
    expected = count_params(model.heads[0]) + sum(p.numel() for n, p in model.backbone.named_parameters()
                                                  if n.startswith(("conv1", "bn1", "layer1.")))
    assert count_params(first) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_threshold_zero_takes_the_first_exit_and_above_one_the_last(name):
    model, x = _model(name)
    with torch.no_grad():
        ref = model(x).logits
        for form in ("eager", "masked"):
            ee = EarlyExitModel(model, 0.0).eval()
            logits, idx = ee(x) if form == "eager" else ee.exportable()(x)
            assert idx.tolist() == [0] * len(x)
            torch.testing.assert_close(logits, ref[0].float(), rtol=0, atol=0)
            ee = EarlyExitModel(model, 1.01).eval()
            logits, idx = ee(x) if form == "eager" else ee.exportable()(x)
            assert idx.tolist() == [model.num_exits - 1] * len(x)
            torch.testing.assert_close(logits, ref[-1].float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18-cifar", "resnet50-imagenet", "preact-journal"])
def test_mixed_threshold_is_per_sample(name):
    model, x = _model(name)
    with torch.no_grad():
        ref = model(x).logits
        conf0 = F.softmax(ref[0], 1).amax(1)
        thr = conf0.median().item()
        ee = EarlyExitModel(model, thr).eval()
        logits, idx = ee(x)
        expected = exit_index_for_threshold(ref, thr)
        assert torch.equal(idx, expected)
        assert (idx == 0).any() and (idx > 0).any()  # the batch really splits
        for b, k in enumerate(idx.tolist()):
            assert bool(F.softmax(ref[k][b], 0).max() >= thr) or k == model.num_exits - 1
            assert all(F.softmax(ref[j][b], 0).max() < thr for j in range(k))  # the *first* confident exit
            torch.testing.assert_close(logits[b], ref[k][b].float(), rtol=1e-5, atol=1e-4)  # smaller batch
        # per-sample: the same answer alone as inside the batch
        for b in (0, 3, 7):
            lb, ib = ee(x[b:b + 1])
            assert ib.item() == idx[b].item()
            torch.testing.assert_close(lb[0], logits[b], rtol=1e-5, atol=1e-5)
        lm, im = ee.exportable()(x)  # the torch.export form agrees
        assert torch.equal(im, idx)
        torch.testing.assert_close(lm, logits, rtol=1e-5, atol=1e-5)


def test_early_exit_refuses_training_mode():
    model, x = _model("resnet18-cifar")
    ee = EarlyExitModel(model, 0.5)
    ee.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        ee(x)


def test_reference_policy_edge_cases():
    logits = [torch.tensor([[10.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [5.0, 0.0]])]
    assert exit_index_for_threshold(logits, 0.9).tolist() == [0, 1]
    assert exit_index_for_threshold(logits, 0.0).tolist() == [0, 0]
    assert exit_index_for_threshold(logits, 1.5).tolist() == [1, 1]
    assert exit_index_for_threshold(logits[:1], 0.9).tolist() == [0, 0]  # a single exit is always taken


def test_policy_curve_by_hand():
    """Three samples, two exits. Exit 0's max-softmax: 0.5 (two equal logits), 0.88 (softmax of [2, 0]: e^2/(e^2+1))
    and 1/3 (three equal logits); exit 1 is right on every sample, exit 0 only on the second."""
    shallow = torch.tensor([[1.0, 1.0, -1e9], [2.0, 0.0, -1e9], [0.0, 0.0, 0.0]])
    deep = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([1, 0, 2])
    rows = {r["threshold"]: r for r in policy_curve([shallow, deep], labels, [0.0, 0.4, 0.6, 0.9], [10.0, 40.0],
                                                    30.0)}
    # threshold 0: all leave at exit 0, whose argmax is 0, 0, 0 -> only sample 2 (label 0) right
    assert rows[0.0]["exit_fraction"] == [1.0, 0.0] and rows[0.0]["top1"] == pytest.approx(100 / 3, abs=1e-4)
    assert rows[0.0]["mean_flops_per_image"] == 10.0 and rows[0.0]["flop_speedup_vs_full"] == 3.0
    # 0.4: samples 1 and 2 leave at exit 0 (0.5, 0.88), sample 3 (1/3) goes on -> right: 2 and 3
    assert rows[0.4]["exit_fraction"] == [round(2 / 3, 6), round(1 / 3, 6)]
    assert rows[0.4]["top1"] == pytest.approx(200 / 3, abs=1e-4)
    assert rows[0.4]["mean_flops_per_image"] == pytest.approx(2 / 3 * 10 + 1 / 3 * 40)
    # 0.6: only sample 2 (0.88) leaves early; 0.9: nobody -> the deep exit, right on all
    assert rows[0.6]["exit_fraction"] == [round(1 / 3, 6), round(2 / 3, 6)] and rows[0.6]["top1"] == 100.0
    assert rows[0.9]["exit_fraction"] == [0.0, 1.0] and rows[0.9]["top1"] == 100.0
    assert rows[0.9]["flop_speedup_vs_full"] == 0.75
    assert policy_curve([shallow, deep], None, [0.5], [10.0, 40.0], 30.0)[0]["top1"] is None


def test_early_exit_torchscript_matches_eager():
    model, x = _model("resnet18-cifar")
    with torch.no_grad():
        ref = model(x).logits
        thr = F.softmax(ref[0], 1).amax(1).median().item()
        ee = EarlyExitModel(model, thr).eval()
        ts = ee.to_torchscript(x[:2])
        for batch in (x, x[:1], x[2:5]):
            le, ie = ee(batch)
            lt, it = ts(batch)
            assert torch.equal(ie, it)
            torch.testing.assert_close(lt, le, rtol=1e-5, atol=1e-5)
        ts.threshold.fill_(0.0)  # the threshold is a buffer of the scripted module
        assert ts(x)[1].tolist() == [0] * len(x)
        ts.threshold.fill_(1.5)
        assert ts(x)[1].tolist() == [model.num_exits - 1] * len(x)
