"""Evaluation: collect every exit's logits over a loader (gathered across ranks), then compute the metrics."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from engine.distributed import DistInfo, all_gather_cat
from engine.metrics import exit_metrics


def autocast(device: torch.device, amp: str):
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def collect_logits(model: nn.Module, loader, device: torch.device, amp: str = "fp32",
                   info: DistInfo | None = None) -> tuple[list[Tensor], Tensor]:
    was_training = model.training
    model.eval()
    per_exit: list[list[Tensor]] = []
    labels = []
    loader.set_epoch(0)
    for batch in loader:
        with autocast(device, amp):
            out = model(batch.images)
        if not per_exit:
            per_exit = [[] for _ in out.logits]
        for store, z in zip(per_exit, out.logits):
            store.append(z.float())
        labels.append(batch.labels)
    model.train(was_training)
    logits = [torch.cat(z) for z in per_exit]
    y = torch.cat(labels)
    if info is not None and info.enabled:
        logits = [all_gather_cat(z, info) for z in logits]
        y = all_gather_cat(y, info)
    return logits, y


def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "fp32", n_bins: int = 15,
             info: DistInfo | None = None) -> dict[str, dict[str, float]]:
    logits, labels = collect_logits(model, loader, device, amp, info)
    res = exit_metrics(logits, labels, n_bins)
    res["_count"] = {"samples": float(len(labels))}
    return res


def deepest_key(res: dict) -> str:
    return max((k for k in res if k.startswith("exit")), key=lambda k: int(k[4:]))


def format_table(res: dict[str, dict[str, float]]) -> str:
    lines = [f"{'predictor':<12} {'top1':>7} {'top5':>7} {'nll':>7} {'ece':>6}"]
    for name, m in res.items():
        if name.startswith("_"):
            continue
        lines.append(f"{name:<12} {m['top1']:7.2f} {m['top5']:7.2f} {m['nll']:7.4f} {m['ece']:6.2f}")
    return "\n".join(lines)


def write_eval(res: dict, path: Path) -> None:
    path.write_text(json.dumps(res, indent=2))
