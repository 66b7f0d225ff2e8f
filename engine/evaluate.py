"""Evaluation: collect every exit's logits (and pooled features, for Recall@1) over a loader, gathered across
ranks, then compute the metrics."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from engine.distributed import DistInfo, all_gather_cat
from engine.metrics import exit_metrics
from engine.precision import autocast


@torch.no_grad()
def collect_outputs(model: nn.Module, loader, device: torch.device, amp: str = "fp32", info: DistInfo | None = None,
                    features: bool = True) -> tuple[list[Tensor], list[Tensor] | None, Tensor]:
    """Every exit's logits (fp32) and, with `features`, its pooled features, plus the labels; all on device."""
    was_training = model.training
    model.eval()
    per_exit: list[list[Tensor]] = []
    per_feat: list[list[Tensor]] = []
    labels = []
    loader.set_epoch(0)
    for batch in loader:
        with autocast(device, amp):
            out = model(batch.images)
        if not per_exit:
            per_exit = [[] for _ in out.logits]
            per_feat = [[] for _ in out.features]
        for store, z in zip(per_exit, out.logits):
            store.append(z.float())
        if features:
            for store, f in zip(per_feat, out.features):
                store.append(f.float().flatten(1))
        labels.append(batch.labels)
    model.train(was_training)
    logits = [torch.cat(z) for z in per_exit]
    feats = [torch.cat(f) for f in per_feat] if features else None
    y = torch.cat(labels)
    if info is not None and info.enabled:
        logits = [all_gather_cat(z, info) for z in logits]
        feats = [all_gather_cat(f, info) for f in feats] if feats is not None else None
        y = all_gather_cat(y, info)
    return logits, feats, y


@torch.no_grad()
def exit_logits(model: nn.Module, batches: Iterable[Tensor], device: torch.device, amp: str = "fp32") -> list[Tensor]:
    """Every exit's logits (fp32, on the CPU) over image batches already on `device`, concatenated in order."""
    with autocast(device, amp):
        outs = [model(x).logits for x in batches]
    return [torch.cat([z.float().cpu() for z in zs]) for zs in zip(*outs)]


def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "fp32", n_bins: int = 15,
             info: DistInfo | None = None, recall: bool = True) -> dict[str, dict]:
    """Per-exit and ensemble top-1/top-5, NLL, ECE (`n_bins` equal-width bins) and, per exit, Recall@1."""
    logits, feats, labels = collect_outputs(model, loader, device, amp, info, features=recall)
    res = exit_metrics(logits, labels, n_bins, feats)
    res["_count"] = {"samples": float(len(labels))}
    return res


def deepest_key(res: dict) -> str:
    return max((k for k in res if k.startswith("exit")), key=lambda k: int(k[4:]))


def format_table(res: dict[str, dict[str, float]]) -> str:
    lines = [f"{'predictor':<12} {'top1':>7} {'top5':>7} {'nll':>7} {'ece':>6} {'R@1':>7}"]
    for name, m in res.items():
        if name.startswith("_"):
            continue
        r1 = f"{m['recall1']:7.2f}" if "recall1" in m else f"{'-':>7}"
        lines.append(f"{name:<12} {m['top1']:7.2f} {m['top5']:7.2f} {m['nll']:7.4f} {m['ece']:6.2f} {r1}")
    return "\n".join(lines)

