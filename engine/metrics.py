"""Classification, calibration and retrieval metrics on collected logits and features (after evaluation).

ECE follows Guo et al. 2017 with equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|, the bins
(lo, hi] as in the Beta-smoothing code's `ECELoss` (a confidence of exactly 1.0 falls in the last bin).
NLL comes from log-probabilities (log_softmax of the logits; for the probability ensemble the log of the mean
probability, by logsumexp), never from a clamped probability, so a confidently wrong row counts its true loss.
Recall@1 (CS-KD, Yun et al. 2020): the share of samples whose nearest other sample by cosine similarity of the
exit's pooled (penultimate) features has the same label.
"""
from __future__ import annotations

import math

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


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean -log p(y) with p = softmax(logits); log-probabilities are valid logits too (log_softmax leaves them)."""
    return -F.log_softmax(logits.double(), 1).gather(1, labels[:, None]).mean().item()


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
    return ece_from_reliability(reliability(probs, labels, n_bins))


def ece_from_reliability(r: dict[str, list[float]]) -> float:
    total = sum(r["count"]) or 1
    return 100.0 * sum(c / total * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]))


@torch.no_grad()
def recall_at_1(features: Tensor, labels: Tensor, chunk: int = 2048) -> float:
    """Recall@1 (%): for each sample, is its nearest *other* sample by cosine similarity of the same class?

    Runs on the features' device in row chunks ([chunk, N] similarities at a time); one host read at the end.
    Ties go to the lowest index. Fewer than 2 samples: NaN.
    """
    n = features.shape[0]
    if n < 2:
        return float("nan")
    f = F.normalize(features.float().flatten(1), dim=1)
    labels = labels.to(f.device)
    hits = torch.zeros((), dtype=torch.long, device=f.device)
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n), device=f.device)
        sim = f[rows] @ f.T  # [c, N]
        sim[torch.arange(len(rows), device=f.device), rows] = -float("inf")  # never one's own neighbour
        hits += (labels[sim.argmax(1)] == labels[rows]).sum()
    return 100.0 * hits.item() / n


def summarize(log_probs: Tensor, labels: Tensor, n_bins: int,
              rows: dict[str, list[float]] | None = None) -> dict[str, float]:
    """top-1/top-5 (%), NLL and ECE (%) of one predictor given its log-probabilities; `rows` (if given) receives
    its reliability bins."""
    res = topk_accuracy(log_probs, labels)
    res["nll"] = nll(log_probs, labels)
    r = reliability(log_probs.exp(), labels, n_bins)
    res["ece"] = ece_from_reliability(r)
    if rows is not None:
        rows.update(r)
    return res


def exit_metrics(logits: list[Tensor], labels: Tensor, n_bins: int = 15,
                 features: list[Tensor] | None = None) -> dict[str, dict]:
    """Per exit (`exit0` shallow .. `exitN` deepest) and both BYOT ensembles: mean of logits, mean of probs.

    With `features` (one pooled [N, D] per exit) each exit also gets `recall1`. The reliability bins of every
    predictor come back under the private key `_reliability` (tables and per-epoch logs skip `_` keys).
    """
    recall = [recall_at_1(f, labels) for f in features] if features is not None else None
    logits = [z.double().cpu() for z in logits]
    labels = labels.cpu()
    rel: dict[str, dict] = {}
    out: dict[str, dict] = {}
    log_p = [F.log_softmax(z, 1) for z in logits]
    for i, lp in enumerate(log_p):
        out[f"exit{i}"] = summarize(lp, labels, n_bins, rel.setdefault(f"exit{i}", {}))
        if recall is not None:
            out[f"exit{i}"]["recall1"] = recall[i]
    if len(logits) > 1:
        out["ens_logits"] = summarize(F.log_softmax(torch.stack(logits).mean(0), 1), labels, n_bins,
                                      rel.setdefault("ens_logits", {}))
        # log(mean_i p_i) = logsumexp_i(log p_i) - log(n): exact even where every p_i underflows
        ens_probs = torch.logsumexp(torch.stack(log_p), 0) - math.log(len(log_p))
        out["ens_probs"] = summarize(ens_probs, labels, n_bins, rel.setdefault("ens_probs", {}))
    out["_reliability"] = rel
    return out
