"""Small configs shared by the engine tests (tiny models on scikit-learn digits, seconds on 2 CPU cores)."""
from __future__ import annotations

from engine.config import Config, load_config

TINY_MODEL = ["model.stem=cifar", "model.num_classes=10", "model.in_chans=1", "model.width=0.25",
              "model.depths=[1,1,1,1]"]
DIGITS = ["data.dataset=digits", "data.image_size=8", "data.augment=none", "data.batch_size=64",
          "data.eval_batch_size=512", "data.val_split=200"]


def tiny_config(tmp_path, *overrides: str) -> Config:
    return load_config(None, [*TINY_MODEL, *DIGITS, "schedule.epochs=2", "schedule.milestones=[100]",
                              "optim.lr=0.05", "logging.progress=false", "logging.log_every=1",
                              f"checkpoint.dir={tmp_path / 'run'}", *overrides])
