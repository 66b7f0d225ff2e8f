"""Multi-generation self-distillation (Zhang & Sabuncu, NeurIPS 2020, `train_distillation.py`).

Generation 0 trains with plain CE. Generation g >= 1 trains a freshly initialised model of the same architecture
with `sd_generation`: (1 - a)·CE + a·softCE(softmax(z_T/T), softmax(z)), the teacher being generation g-1's
best-validation checkpoint (`gen<g-1>/best.pt`), frozen, in eval mode.

Each generation is an ordinary run in `<checkpoint.dir>/gen<g>` (config, metrics, checkpoints, summary, plots)
plus `generation.json` (which teacher it used: path, epoch, SHA-256 of the weights). The chain's own
`<checkpoint.dir>/summary.json` lists every generation and repeats the last one's test figures.

Resuming (`train --generations N` again, same checkpoint.dir): a generation whose summary.json is complete is
skipped; the first unfinished one resumes from its last.pt (checkpoint.resume=auto); the rest start fresh.

Deviation: every generation uses the same `seed`, because the seed also fixes the validation split carved from
train (a new split would let generation g select on images its teacher trained on); so "fresh initialisation"
means the same random init as generation 0, not a new draw (the official code draws a new one).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from engine.checkpoint import atomic_write_text
from engine.config import Config, ConfigError, validate
from engine.objectives.teacher import load_teacher
from engine.rundir import check_run_dir, run_lock
from engine.train import train


def generation_dir(cfg: Config, g: int) -> Path:
    return Path(cfg.checkpoint.dir) / f"gen{g}"


def generation_config(cfg: Config, g: int) -> Config:
    """The single-run config of generation g."""
    gcfg = copy.deepcopy(cfg)
    gcfg.generations = 1
    gcfg.checkpoint.dir = str(generation_dir(cfg, g))
    gcfg.checkpoint.resume = "auto"
    if g == 0:
        gcfg.objective.name = "ce"
        gcfg.objective.teacher.checkpoint = None
    else:
        gcfg.objective.name = "sd_generation"
        gcfg.objective.teacher.checkpoint = str(generation_dir(cfg, g - 1) / "best.pt")
    validate(gcfg)
    return gcfg


def _finished(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return None if summary.get("interrupted") else summary


def _holds_chain(base: Path) -> bool:
    summary = base / "summary.json"
    try:
        return summary.is_file() and "generations" in json.loads(summary.read_text())
    except (OSError, ValueError):
        return False


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_generations(cfg: Config, device: str | None = None, on_step=None) -> dict:
    """Train (or finish) the chain of `cfg.generations` generations; returns the chain summary.

    `on_step(generation, step) -> True` stops the current generation like SIGTERM does (tests)."""
    if cfg.generations < 2:
        raise ConfigError(f"generations={cfg.generations}: a chain needs at least 2 (use `train` for one run)")
    if not cfg.data.val_split and not cfg.data.select_on_test and cfg.data.dataset != "imagefolder":
        raise ConfigError("multi-generation distillation picks each teacher on validation data: set "
                          "data.val_split (images carved from train) or data.select_on_test=true")
    base = Path(cfg.checkpoint.dir)
    # a chain's folder holds the chain and nothing else: a single run there is refused (the chain would write its
    # generations beside it and replace its summary.json); a chain of its own is continued or re-read
    if not _holds_chain(base):
        check_run_dir(base, resuming=cfg.checkpoint.resume is not None, overwrite=cfg.checkpoint.overwrite)
    with run_lock(base, enabled=_is_main()):
        return _chain(cfg, base, device, on_step)


def _chain(cfg: Config, base: Path, device: str | None, on_step) -> dict:
    gens: list[dict] = []
    for g in range(cfg.generations):
        gcfg = generation_config(cfg, g)
        run_dir = Path(gcfg.checkpoint.dir)
        record = {"generation": g, "run_dir": str(run_dir), "objective": gcfg.objective.name, "teacher": None}
        if g > 0:
            teacher_path = Path(gcfg.objective.teacher.checkpoint)
            if not teacher_path.is_file():
                raise FileNotFoundError(f"generation {g - 1} left no best-validation checkpoint {teacher_path} "
                                        "(no validation split was evaluated?)")
            _, record["teacher"] = load_teacher(teacher_path, "cpu")
        done = _finished(run_dir)
        if done is not None:
            gens.append({**record, "skipped": True, **_figures(done)})
            continue
        if _is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(record, indent=2), run_dir / "generation.json")
        step_hook = (lambda step, _g=g: on_step(_g, step)) if on_step is not None else None
        summary = train(gcfg, on_step=step_hook, device=device)
        if summary.get("interrupted"):
            return {"interrupted": True, "generation": g, "epoch": summary["epoch"], "batch": summary["batch"],
                    "step": summary["step"], "run_dir": str(base), "generations": gens}
        gens.append({**record, "skipped": False, **_figures(summary)})
    chain = {"run_dir": str(base), "generations": gens}
    for key in ("test_best", "test_last", "best_val_top1", "best_epoch"):
        if key in gens[-1]:
            chain[key] = gens[-1][key]
    if _is_main():
        atomic_write_text(json.dumps(chain, indent=2), base / "summary.json")
    return chain


def _figures(summary: dict) -> dict:
    return {k: summary[k] for k in ("test_best", "test_last", "best_val_top1", "best_epoch", "epochs", "steps")
            if k in summary}
