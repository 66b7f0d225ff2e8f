"""`selfdistill eval --checkpoint CKPT`: rebuild the run's model and data from the checkpoint, evaluate a split."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.distributed import init_distributed
from engine.evaluate import evaluate
from engine.setup_run import check_data_matches, data_from_config


def split_loader(cfg, split: str | None, device: torch.device, rank: int = 0, world: int = 1) -> tuple[Any, str]:
    """(loader, split) of one split of the config's data, checked against the model's config; split None = val where
    the data has one, else test. The loader is None where the data has no such split."""
    data = data_from_config(cfg, device, rank, world)
    check_data_matches(cfg, data)
    split = split or ("val" if data.val is not None else "test")
    return (data.test if split == "test" else data.val), split


def evaluate_checkpoint(path: str, split: str = "test", overrides: list[str] = (), bins: int | None = None,
                        out: str | None = None, device: str | None = None) -> dict:
    info = init_distributed("auto", device)
    ck = load_checkpoint(path, info.device)
    model, cfg = model_from_checkpoint(ck, list(overrides), path=str(path))
    loader, _ = split_loader(cfg, split, info.device, info.rank, info.world)
    if loader is None:
        raise FileNotFoundError(f"the run's data has no {split} split (data.dataset={cfg.data.dataset}, "
                                f"data.val_split={cfg.data.val_split})")
    model = model.to(info.device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    res = evaluate(model, loader, info.device, cfg.precision.amp, bins or cfg.logging.ece_bins, info)
    res["_meta"] = {"checkpoint": str(path), "split": split, "ece_bins": bins or cfg.logging.ece_bins}
    if info.is_main:
        target = Path(out) if out else Path(path).with_name(f"eval_{split}_{Path(path).stem}.json")
        target.write_text(json.dumps(res, indent=2))
    return res
