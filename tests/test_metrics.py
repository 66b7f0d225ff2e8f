"""Calibration and retrieval metrics against scikit-learn and hand-computed values; the PNG reports."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import dump_yaml, load_config
from engine.evaluate import format_table
from engine.metrics import ece, exit_metrics, nll, recall_at_1, reliability, topk_accuracy
from engine.models import create_model
from engine.plots import run_gflops, write_run_plots


def _probs(n=500, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2.5
    labels = torch.randint(0, k, (n,), generator=g)
    # make the predictions informative so every bin has both hits and misses
    logits[torch.arange(n), labels] += torch.rand(n, generator=g, dtype=torch.float64) * 3
    return F.softmax(logits, 1), labels


def test_nll_matches_sklearn_log_loss():
    from sklearn.metrics import log_loss

    probs, labels = _probs()
    expected = log_loss(labels.numpy(), probs.numpy(), labels=list(range(7)))
    assert nll(probs.log(), labels) == pytest.approx(expected, rel=1e-10)
    assert nll(probs.log() + 3.0, labels) == pytest.approx(expected, rel=1e-10)  # logits: any shift per row


def test_nll_is_exact_for_confidently_wrong_rows():
    # p(true) = 1/(1 + e^40) ~ 4e-18 and 1/(1 + e^800) = 0 in float64: a clamp at 1e-12 would count 27.6 nats
    logits = torch.tensor([[0.0, 40.0], [0.0, 800.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    assert nll(logits[:1], labels[:1]) == pytest.approx(40 + np.log1p(np.exp(-40.0)), rel=1e-12)
    assert nll(logits, labels) == pytest.approx((40 + 800) / 2, rel=1e-12)
    # the probability ensemble too: log((e^-800 + e^-900) / 2) = -800 + log((1 + e^-100) / 2)
    res = exit_metrics([logits[1:], torch.tensor([[0.0, 900.0]], dtype=torch.float64)], labels[1:], 10)
    assert res["exit0"]["nll"] == pytest.approx(800, rel=1e-12)
    assert res["ens_probs"]["nll"] == pytest.approx(800 + np.log(2), rel=1e-12)
    assert res["ens_logits"]["nll"] == pytest.approx(850, rel=1e-12)


@pytest.mark.parametrize("n_bins", [10, 15, 20])
def test_ece_and_reliability_match_sklearn_calibration_curve(n_bins):
    from sklearn.calibration import calibration_curve

    probs, labels = _probs(seed=n_bins)
    conf, pred = probs.max(1)
    correct = (pred == labels).numpy().astype(float)
    prob_true, prob_pred = calibration_curve(correct, conf.numpy(), n_bins=n_bins, strategy="uniform")
    # bin masses with sklearn's own binning rule (searchsorted on the inner edges: intervals (lo, hi])
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf.numpy())
    counts = np.bincount(ids, minlength=n_bins)
    nonempty = counts > 0
    expected = 100 * np.sum(counts[nonempty] / len(labels) * np.abs(prob_true - prob_pred))
    assert ece(probs, labels, n_bins) == pytest.approx(expected, rel=1e-9)
    r = reliability(probs, labels, n_bins)
    assert r["count"] == counts.tolist()
    np.testing.assert_allclose(np.array(r["accuracy"])[nonempty], prob_true, rtol=1e-12)
    np.testing.assert_allclose(np.array(r["confidence"])[nonempty], prob_pred, rtol=1e-12)


def test_ece_by_hand():
    # 4 samples, 2 bins (0, .5], (.5, 1]:
    #   conf .4 wrong, .45 right -> bin 1: acc .5, conf .425, |gap| .075, mass .5
    #   conf .8 right, .9 wrong  -> bin 2: acc .5, conf .85,  |gap| .35,  mass .5
    #   ECE = .5 * .075 + .5 * .35 = .2125 -> 21.25 %
    probs = torch.tensor([[0.4, 0.35, 0.25], [0.45, 0.3, 0.25], [0.8, 0.1, 0.1], [0.9, 0.05, 0.05]],
                         dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 2])
    assert ece(probs, labels, 2) == pytest.approx(21.25, abs=1e-10)
    # NLL = -(ln .35 + ln .45 + ln .8 + ln .05) / 4
    assert nll(probs.log(), labels) == pytest.approx(-np.log([0.35, 0.45, 0.8, 0.05]).mean(), rel=1e-12)
    assert topk_accuracy(probs, labels, (1, 2)) == pytest.approx({"top1": 50.0, "top2": 75.0})


@pytest.mark.parametrize("n_bins", [10, 15, 20])
def test_ece_bins_are_left_open_right_closed_and_hold_confidence_one(n_bins):
    # Confidences exactly on edges (the same float64 edges the metric uses) belong to the bin they close, and 1.0
    # to the last bin: with [lo, hi) bins 1.0 would fall out of every bin and the edge rows move up one bin.
    e = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    k6, k8 = (6 * n_bins) // 10, (8 * n_bins) // 10  # edges at 0.6 and 0.8
    mid = (e[k6] + e[k6 + 1]) / 2  # strictly inside the bin above the 0.6 edge
    conf = torch.stack([e[k6], mid, e[k8], e[-1], e[-1]])
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.tensor([0, 0, 1, 0, 0])  # right, right, wrong, right, right
    r = reliability(probs, labels, n_bins)
    counts = [0] * n_bins
    counts[k6 - 1] += 1  # e[k6] closes bin k6-1
    counts[k6] += 1  # mid
    counts[k8 - 1] += 1  # e[k8] closes bin k8-1
    counts[-1] += 2  # 1.0
    assert r["count"] == counts
    expected = 100 * ((1 - e[k6]) + (1 - mid) + e[k8] + 0 + 0).item() / 5
    assert ece(probs, labels, n_bins) == pytest.approx(expected, rel=1e-12)


def test_ensembles_by_hand():
    # Three exits, two classes, two samples.
    #   sample A (label 0): exits give p0 = 3/4, 3/4, 1/100  (logits [ln 3, 0], [ln 3, 0], [0, ln 99])
    #     mean of logits [2 ln 3 / 3, ln 99 / 3] -> p0 = 9^(1/3) / (9^(1/3) + 99^(1/3)) = 0.3102: predicts 1, wrong
    #     mean of probs  p0 = (3/4 + 3/4 + 1/100) / 3 = 0.50333: predicts 0, right
    #   sample B (label 1): every exit gives p = [0.2, 0.8], so both ensembles do too: right, confidence 0.8
    ln = np.log
    zA = [[ln(3), 0.0], [ln(3), 0.0], [0.0, ln(99)]]
    zB = [[0.0, ln(4)]] * 3
    logits = [torch.tensor([a, b], dtype=torch.float64) for a, b in zip(zA, zB)]
    labels = torch.tensor([0, 1])
    res = exit_metrics(logits, labels, 4)  # bins (0, .25], (.25, .5], (.5, .75], (.75, 1]
    pA_log = 9 ** (1 / 3) / (9 ** (1 / 3) + 99 ** (1 / 3))
    pA_prob = (0.75 + 0.75 + 0.01) / 3
    assert res["ens_logits"]["top1"] == 50.0 and res["ens_probs"]["top1"] == 100.0
    assert res["ens_logits"]["nll"] == pytest.approx(-(ln(pA_log) + ln(0.8)) / 2, rel=1e-12)
    assert res["ens_probs"]["nll"] == pytest.approx(-(ln(pA_prob) + ln(0.8)) / 2, rel=1e-12)
    # ECE: A in (.5, .75] (confidence 1 - pA_log = 0.69, wrong / pA_prob = 0.503, right), B in (.75, 1]
    assert res["ens_logits"]["ece"] == pytest.approx(100 * ((1 - pA_log) + 0.2) / 2, rel=1e-12)
    assert res["ens_probs"]["ece"] == pytest.approx(100 * ((1 - pA_prob) + 0.2) / 2, rel=1e-12)
    assert res["exit2"]["top1"] == 50.0 and res["exit2"]["nll"] == pytest.approx(-(ln(0.01) + ln(0.8)) / 2)


def test_recall_at_1_toy_embedding():
    # unit vectors at angles 0, 10, 20 (class 0), 80, 90 (class 1) and an outlier of class 0 at 86 degrees:
    #   0 -> 10 hit, 10 -> 0 or 20 hit, 20 -> 10 hit, 80 -> 86 miss, 90 -> 86 miss, 86 -> 90 miss  => 3/6
    deg = torch.tensor([0.0, 10, 20, 80, 90, 86]).deg2rad()
    feats = torch.stack([deg.cos(), deg.sin()], 1)
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    assert recall_at_1(feats, labels) == pytest.approx(50.0)
    # cosine, not Euclidean: rescaling vectors changes nothing; a sample is never its own neighbour
    scale = torch.tensor([[10.0], [1], [3], [0.2], [1], [7]])
    assert recall_at_1(feats * scale, labels) == pytest.approx(50.0)
    assert recall_at_1(torch.eye(3), torch.tensor([0, 1, 2])) == 0.0
    assert recall_at_1(torch.eye(3)[[0, 0, 1]], torch.tensor([4, 4, 1])) == pytest.approx(200 / 3)


def test_recall_at_1_chunks_agree_and_match_brute_force():
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(301, 16, generator=g), torch.randint(0, 5, (301,), generator=g)
    f = F.normalize(feats.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2)
    brute = 100 * (labels[sim.argmax(1)] == labels).double().mean().item()
    assert recall_at_1(feats, labels, chunk=7) == pytest.approx(brute)
    assert recall_at_1(feats, labels, chunk=4096) == pytest.approx(brute)


def test_exit_metrics_per_exit_recall_and_reliability():
    probs, labels = _probs(n=64, k=5)
    logits = [probs.log(), probs.log() * 0.5]
    feats = [torch.randn(64, 8), torch.randn(64, 4)]
    res = exit_metrics(logits, labels, 10, feats)
    assert set(res) == {"exit0", "exit1", "ens_logits", "ens_probs", "_reliability"}
    assert res["exit0"]["recall1"] == pytest.approx(recall_at_1(feats[0], labels))
    assert "recall1" not in res["ens_logits"]
    assert set(res["_reliability"]) == {"exit0", "exit1", "ens_logits", "ens_probs"}
    assert sum(res["_reliability"]["exit1"]["count"]) == 64
    assert res["exit0"]["ece"] == pytest.approx(ece(probs, labels, 10))
    table = format_table(res)
    assert "R@1" in table and "_reliability" not in table


def test_plots_are_written(tmp_path):
    probs, labels = _probs(n=64, k=5)
    last = exit_metrics([probs.log(), probs.log() * 2], labels, 15, [torch.randn(64, 3)] * 2)
    best = exit_metrics([probs.log() * 0.5, probs.log()], labels, 15)
    files = write_run_plots(tmp_path, {"test_last": last, "test_best": best})
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["exit_accuracy.png", "reliability.png"]
    for p in files:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert write_run_plots(tmp_path, {"interrupted": True}) == []


def _conv_linear_flops(model, x, keep) -> int:
    """Independent count: 2 * output elements * (input channels / groups) * kernel area, per Conv2d / Linear whose
    qualified name passes `keep`."""
    total = []

    def hook(name):
        def fn(m, inp, out):
            if keep(name):
                k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) \
                    else m.in_features
                total.append(2 * out.numel() * k)
        return fn

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return sum(total)


def test_run_gflops_per_exit_and_tradeoff_panel(tmp_path):
    cfg = load_config(None, ["model.stem=cifar", "model.width=0.25", "model.depths=[1,1,1,1]", "model.num_classes=5",
                             "model.in_chans=1", "data.image_size=16", "exits.stages=[0,1,2]"])
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    g = run_gflops(tmp_path)
    model = create_model(cfg.model, cfg.exits)
    x = torch.zeros(1, 1, 16, 16)
    stem_and = lambda *parts: lambda n: n.startswith(("backbone.conv1", *parts))  # noqa: E731
    expect = {"exit0": _conv_linear_flops(model, x, stem_and("backbone.layer1", "heads.0")),
              "exit1": _conv_linear_flops(model, x, stem_and("backbone.layer1", "backbone.layer2", "heads.1")),
              "exit3": _conv_linear_flops(model, x, lambda n: n.startswith("backbone.")),
              "all_exits": _conv_linear_flops(model, x, lambda n: True)}
    for k, v in expect.items():
        assert g[k] == pytest.approx(v / 1e9, rel=1e-12), k
    assert g["exit0"] < g["exit1"] < g["exit2"] < g["exit3"] < g["all_exits"]
    probs, labels = _probs(n=64, k=5)
    summary = {"test_best": exit_metrics([probs.log() * s for s in (0.5, 1, 2, 3)], labels, 15)}
    files = write_run_plots(tmp_path, summary)
    assert json.loads((tmp_path / "exit_gflops.json").read_text()) == pytest.approx(g)
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["exit_accuracy.png", "exit_gflops.json", "reliability.png"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text(dump_yaml(load_config(None, ["exits.stages=[]"])))
    assert run_gflops(plain) is None  # one exit: nothing to trade off
