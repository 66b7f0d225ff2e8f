"""Classification and calibration metrics on collected logits (host side, after evaluation).

ECE follows Guo et al. 2017 with equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|, the bins
(lo, hi] as in the Beta-smoothing code's `ECELoss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        top = logits.topk(k_eff, dim=1).indices
        out[f"top{k}"] = 100.0 * (top == labels[:, None]).any(1).double().mean().item()
    return out


def nll(probs: Tensor, labels: Tensor) -> float:
    return -torch.log(probs.double().gather(1, labels[:, None]).clamp_min(1e-12)).mean().item()


def reliability(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    rows = {"lo": [], "hi": [], "count": [], "accuracy": [], "confidence": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        n = int(m.sum())
        rows["lo"].append(float(lo))
        rows["hi"].append(float(hi))
        rows["count"].append(n)
        rows["accuracy"].append(float(correct[m].mean()) if n else 0.0)
        rows["confidence"].append(float(conf[m].mean()) if n else 0.0)
    return rows


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    r = reliability(probs, labels, n_bins)
    total = len(labels)
    return 100.0 * sum(c / total * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]))


def summarize_probs(probs: Tensor, labels: Tensor, n_bins: int) -> dict[str, float]:
    """top-1/top-5 (%), NLL and ECE (%) of one predictor."""
    res = topk_accuracy(probs, labels)
    res["nll"] = nll(probs, labels)
    res["ece"] = ece(probs, labels, n_bins)
    return res


def exit_metrics(logits: list[Tensor], labels: Tensor, n_bins: int = 15) -> dict[str, dict[str, float]]:
    """Per exit (`exit0` shallow .. `exitN` deepest) and both BYOT ensembles: mean of logits, mean of probs."""
    logits = [z.double().cpu() for z in logits]
    labels = labels.cpu()
    out = {f"exit{i}": summarize_probs(F.softmax(z, 1), labels, n_bins) for i, z in enumerate(logits)}
    if len(logits) > 1:
        out["ens_logits"] = summarize_probs(F.softmax(torch.stack(logits).mean(0), 1), labels, n_bins)
        out["ens_probs"] = summarize_probs(torch.stack([F.softmax(z, 1) for z in logits]).mean(0), labels, n_bins)
    return out
