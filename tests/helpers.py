"""Small configs shared by the engine tests (tiny models on scikit-learn digits, seconds on 2 CPU cores)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from engine.config import Config, load_config

TINY_MODEL = ["model.stem=cifar", "model.num_classes=10", "model.in_chans=1", "model.width=0.25",
              "model.depths=[1,1,1,1]"]
DIGITS = ["data.dataset=digits", "data.image_size=8", "data.augment=none", "data.batch_size=64",
          "data.eval_batch_size=512", "data.val_split=200"]


TINY_RUN = ["schedule.epochs=2", "schedule.milestones=[100]", "optim.lr=0.05", "logging.progress=false",
            "logging.log_every=1"]


def layered(*overrides: str) -> list[str]:
    """Overrides with each key once, a later value replacing an earlier one in place: the command line refuses a
    key given twice, so the tests' defaults and a test's own values are merged before they reach it."""
    merged: dict[str, str] = {}
    for ov in overrides:
        merged[ov.split("=", 1)[0]] = ov
    return list(merged.values())


def tiny_args(tmp_path, *overrides: str) -> list[str]:
    """The overrides of `tiny_config`, for the `selfdistill train` command line."""
    return layered(*TINY_MODEL, *DIGITS, *TINY_RUN, f"checkpoint.dir={tmp_path / 'run'}", *overrides)


def tiny_config(tmp_path, *overrides: str) -> Config:
    return load_config(None, tiny_args(tmp_path, *overrides))


TIMING = ("time", "img_per_s", "run_dir", "plots")  # differ between any two runs


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    """A run's metrics without the fields that differ between any two runs: JSONL records or CSV rows."""
    if name.endswith(".csv"):
        with open(run / name) as f:
            return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]
    rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
