"""Calibration and retrieval metrics against scikit-learn and hand-computed values; the PNG reports."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.evaluate import format_table
from engine.metrics import ece, exit_metrics, nll, recall_at_1, reliability, topk_accuracy
from engine.plots import write_run_plots


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
    assert nll(probs, labels) == pytest.approx(log_loss(labels.numpy(), probs.numpy(), labels=list(range(7))),
                                               rel=1e-10)


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
    assert nll(probs, labels) == pytest.approx(-np.log([0.35, 0.45, 0.8, 0.05]).mean(), rel=1e-12)
    assert topk_accuracy(probs, labels, (1, 2)) == pytest.approx({"top1": 50.0, "top2": 75.0})


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
