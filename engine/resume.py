"""Starting a run: check the run directory and the checkpoint to resume before anything is written, then restore.

A resume continues the same run, so the checkpoint's config must match the one given now, except for keys that do
not change what is computed (`RESUME_FREE`: where files are, how often to log, how many epochs in all, ...). The
error lists every key that differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from engine.checkpoint import CheckpointError, config_diff, load_checkpoint, load_weights, set_rng_state
from engine.config import Config, to_dict
from engine.rundir import check_run_dir

RESUME_FREE = ("checkpoint.", "logging.", "generations", "schedule.epochs", "data.root", "data.workers",
               "data.eval_batch_size", "data.dali_prefetch", "data.dali_hw_decoder_load",
               "precision.compile", "precision.compile_mode", "precision.compile_backend",
               "distributed.backend", "distributed.timeout_s", "objective.self_check")
RESUME_KEYS = ("model", "optimizer", "scaler", "objective", "rng", "state", "config")


@dataclass(frozen=True)
class Start:
    """How a run starts: `fresh`; `resume` from `checkpoint` (read from `path`); or `resume-none`, a `--resume auto`
    that found no checkpoint yet and starts from step 0 in the directory it was pointed at."""

    kind: Literal["fresh", "resume", "resume-none"]
    checkpoint: Optional[dict] = None
    path: Optional[str] = None

    @property
    def records(self) -> Optional[dict]:
        """How many metric records to keep: all for a fresh run, none without a checkpoint, else its own count."""
        if self.kind == "fresh":
            return None
        return self.checkpoint.get("records") if self.checkpoint else {"jsonl": 0, "csv": 0, "eval_csv": 0}


def open_run(cfg: Config) -> Start:
    """How the run starts, after the run directory and the checkpoint to resume are checked. Reads only: a refused
    run leaves the directory exactly as it was."""
    run = Path(cfg.checkpoint.dir)
    resume = cfg.checkpoint.resume
    check_run_dir(run, resuming=resume is not None, overwrite=cfg.checkpoint.overwrite)
    if resume is None:
        return Start("fresh")
    path = run / "last.pt" if resume == "auto" else Path(resume)
    if resume == "auto" and not path.is_file():
        return Start("resume-none")
    ck = load_checkpoint(path, "cpu")
    missing = [k for k in RESUME_KEYS if k not in ck]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: it holds no {', '.join(missing)} (not a training "
                              "checkpoint)")
    diff = config_diff(ck["config"], to_dict(cfg), ignore=RESUME_FREE)
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the config differs in {len(diff)} key(s): "
                              f"{'; '.join(diff)} (checkpoint vs now). Resume with the run's own config "
                              "(its config.yaml), or start a new run in another checkpoint.dir")
    return Start("resume", ck, str(path))


def restore(c, start: Start, cfg: Config) -> None:
    """Load model, optimizer, scaler, objective, EMA and RNG state; any mismatch names the checkpoint."""
    ck, path = start.checkpoint, start.path
    load_weights(c.model, ck["model"], path, ck["config"], cfg)
    try:
        c.optimizer.load_state_dict(ck["optimizer"])
        c.scaler.load_state_dict(ck["scaler"])
        c.objective.load_state_dict(ck["objective"])
        if c.ema is not None and ck.get("ema") is not None:
            c.ema.module.load_state_dict(ck["ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot resume from {path}: its training state does not fit ({reason})") from None
    set_rng_state(ck["rng"])
