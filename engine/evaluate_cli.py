"""`selfdistill eval --checkpoint CKPT`: rebuild the run's model and data from the checkpoint, evaluate a split."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, load_checkpoint, load_weights
from engine.config import Config, config_from_dict
from engine.distributed import init_distributed
from engine.evaluate import evaluate
from engine.models import MultiExitModel, create_model
from engine.setup_run import check_data_matches
from pipelines.factory import build_data


def config_from_checkpoint(ck: dict, overrides: list[str] = ()) -> Config:
    return config_from_dict(ck["config"], overrides)


def model_from_checkpoint(ck: dict, overrides: list[str] = (), weights: str = "model",
                          path: str = "the checkpoint") -> tuple[MultiExitModel, Config]:
    """The run's model with `ck[weights]` loaded ('model', or 'ema' for the EMA weights), on CPU, and its config."""
    cfg = config_from_checkpoint(ck, overrides)
    state = ck.get(weights)
    if state is None:
        raise CheckpointError(f"{path} has no '{weights}' weights")
    model = create_model(cfg.model, cfg.exits)
    load_weights(model, state, path, ck["config"], cfg)
    return model, cfg


def evaluate_checkpoint(path: str, split: str = "test", overrides: list[str] = (), bins: int | None = None,
                        out: str | None = None, device: str | None = None) -> dict:
    info = init_distributed("auto", device)
    ck = load_checkpoint(path, info.device)
    model, cfg = model_from_checkpoint(ck, list(overrides), path=str(path))
    data = build_data(cfg, info.device, info.rank, info.world)
    check_data_matches(cfg, data)
    loader = data.test if split == "test" else data.val
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
