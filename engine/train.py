"""The training loop around `engine.step.train_step`: epochs of steps, a logging boundary (`engine.monitor`) every
`logging.log_every` steps and at each epoch's end, where a non-finite value stops the run before a checkpoint holds
it; evaluation and checkpoints at each epoch's end; the test figures at the end.

Stopping: SIGTERM / Ctrl-C ask for a stop. A single process stops after the current step; under DDP the request
travels with the next boundary's all-reduce and every rank stops at that step. `last.pt` then holds everything a
resume needs, including the logging window cut by the stop, so the resumed run logs exactly what an uninterrupted
one would.
"""
from __future__ import annotations

import gc
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from engine.checkpoint import CheckpointError, atomic_save, rng_state, unwrap
from engine.config import Config, ConfigError, to_dict
from engine.distributed import all_gather_object, barrier, broadcast_buffers, cleanup
from engine.evaluate import deepest_key, evaluate
from engine.monitor import StopFlag, TrainingDiverged, Window, raise_if_diverged
from engine.resume import open_run, restore
from engine.rundir import RunDir, run_lock
from engine.setup_run import Components, build_components
from engine.step import StepSettings, train_step
from engine.summary import eval_model, final_summary

__all__ = ["TrainState", "TrainingDiverged", "train"]


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps so far
    best_metric: float = -1.0
    best_epoch: int = 0  # 1-based epoch of the best validation score; 0 = none selected
    history: list = field(default_factory=list)  # per-epoch eval summaries
    saved: dict = field(default_factory=dict)  # checkpoint name -> [epoch, step] when last written


def train(cfg: Config, on_step: Optional[Callable[[int], bool]] = None, device: str | None = None) -> dict:
    """Train one run. `on_step(step) -> True` requests a stop like SIGTERM does (used by tests)."""
    with run_lock(cfg.checkpoint.dir, enabled=int(os.environ.get("RANK", "0")) == 0):  # rank 0 writes the run
        return _train(cfg, on_step, device)


def _train(cfg: Config, on_step: Optional[Callable[[int], bool]], device: str | None) -> dict:
    start = open_run(cfg)  # refuses, or loads and checks the checkpoint to resume, before anything is written
    c = build_components(cfg, device)
    ck = start.checkpoint
    same_start(ck, c.info)
    run = None
    try:
        st, window = TrainState(), Window(scaler_skips=c.scaler.is_enabled())
        if ck is not None:
            restore(c, start, cfg)  # a state that does not fit stops the run here, still before any write
            st = TrainState(**ck["state"])
            if ck.get("window"):
                window.load_state_dict(ck["window"], c.info.device)
        # Resuming cuts the metrics back to what the checkpoint had seen (all of them when there is none yet).
        run = RunDir(cfg.checkpoint.dir, cfg, enabled=c.info.is_main, records=start.records,
                     overwrite=cfg.checkpoint.overwrite and start.kind == "fresh")
        loader, steps_per_epoch = c.data.train, len(c.data.train)
        if steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training shard "
                              f"({loader.num_samples} samples): no full batch")
        bar = tqdm(total=steps_per_epoch * cfg.schedule.epochs, initial=st.step, disable=not (
            c.info.is_main and cfg.logging.progress), dynamic_ncols=True, unit="step")
        params, asked, stopped = list(c.model.parameters()), False, False
        buffers = tuple(b for b in c.model.buffers() if b.is_floating_point())
        c.train_model.train()
        parts, settings = c.step_parts, StepSettings.from_config(cfg, c.info.device, steps_per_epoch)
        pace = (time.perf_counter(), st.step, steps_per_epoch * cfg.schedule.epochs)  # for the epoch line's ETA
        with StopFlag() as stop:
            while st.epoch < cfg.schedule.epochs and not stopped:
                loader.set_epoch(st.epoch, st.batch)
                for batch in loader:
                    train_step(parts, settings, batch, st.step, window)
                    st.step, st.batch = st.step + 1, st.batch + 1
                    bar.update(1)
                    asked = asked or stop.requested or (on_step is not None and on_step(st.step))
                    boundary = st.step % cfg.logging.log_every == 0 or st.batch == steps_per_epoch
                    agreed = boundary and _log_window(cfg, c, run, bar, st, window, params, asked, buffers)
                    if agreed or (asked and not c.info.enabled):
                        # a single process stopping inside a window: check it, keep it in last.pt
                        _save_inside_window(cfg, c, run, st, window, params, asked, buffers)
                        stopped = True
                        break
                    if cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0 \
                            and st.batch != steps_per_epoch:  # mid-epoch; the epoch's end saves anyway
                        _save_inside_window(cfg, c, run, st, window, params, False, buffers)
                if not stopped and window.n and st.batch != steps_per_epoch:
                    # the loader yielded fewer batches than planned (data.skip_corrupt dropped whole batches): the
                    # epoch's last window is checked and logged here, before the epoch's checkpoint
                    _log_window(cfg, c, run, bar, st, window, params, asked, buffers)
                if not stopped:
                    st.batch, st.epoch = 0, st.epoch + 1
                    _end_of_epoch(cfg, c, run, st, window, pace)
        bar.close()
        summary = ({"interrupted": True, "epoch": st.epoch, "batch": st.batch, "step": st.step} if stopped
                   else final_summary(cfg, c, run, st.step, st.best_epoch, st.best_metric))
        run.write_json("summary.json", summary)
        barrier(c.info)  # no rank exits (and makes torchrun stop the others) while rank 0 still writes
        return summary
    finally:
        if run is not None:
            run.close()
        # DDP's reducer holds the process group: freed after the group is destroyed, on a rank whose peer has exited,
        # its destructor can wait for gloo's worker threads until the collective timeout. So release it first, while
        # every rank is still here.
        c = parts = None  # noqa: F841
        gc.collect()
        cleanup()


def _log_window(cfg: Config, c: Components, run: RunDir, bar, st: TrainState, window: Window, params,
                asked: bool, buffers: tuple = ()) -> bool:
    """Read, check and log the window; returns whether any rank asked to stop."""
    reading = window.read(params, c.info, asked, buffers)
    raise_if_diverged(reading, st, cfg.checkpoint.dir)
    rate = window.n * cfg.data.batch_size * c.info.world / max(time.perf_counter() - window.t0, 1e-9)
    run.log({"kind": "train", "epoch": st.epoch, "step": st.step, "lr": c.optimizer.param_groups[0]["lr"],
             "img_per_s": round(rate, 1), **reading.values})
    bar.set_postfix(loss=f"{reading.values['loss']:.4f}", img_s=f"{rate:.0f}")
    window.reset()
    return reading.stop


def same_start(ck: Optional[dict], info) -> None:
    """Every rank loads the checkpoint it resumes from by itself: on several nodes, one that cannot see the run
    directory would start afresh while the others resume. So the ranks compare what they read (step and a digest
    of the weights) and stop with a CheckpointError if they differ."""
    if not info.enabled:
        return
    mine = None if ck is None else (ck["state"]["step"], _digest(ck["model"]))
    seen = all_gather_object(mine, info)
    if len(set(seen)) > 1:
        where = ", ".join(f"rank {r}: {'no checkpoint' if s is None else f'step {s[0]}'}" for r, s in enumerate(seen))
        raise CheckpointError(f"the ranks read different checkpoints to resume from ({where}); every node must see "
                              "the same checkpoint.dir (shared storage)")


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:4096])
    return h.hexdigest()


def _end_of_epoch(cfg: Config, c: Components, run: RunDir, st: TrainState, window: Window,
                  pace: tuple = ()) -> None:
    selector = c.data.val if c.data.val is not None else (c.data.test if cfg.data.select_on_test else None)
    rec: dict = {"kind": "eval", "epoch": st.epoch, "step": st.step}
    broadcast_buffers(c.model, c.info)  # evaluate with what last.pt holds, on every rank
    if selector is not None:
        # Recall@1 gathers every pooled feature across ranks: once at the end, not every epoch.
        res = evaluate(eval_model(cfg, c), selector, c.info.device, cfg.precision.amp, cfg.logging.ece_bins, c.info,
                       recall=False)
        rec["select"] = {k: v for k, v in res.items() if not k.startswith("_")}
        if res[deepest_key(res)]["top1"] > st.best_metric:
            st.best_metric, st.best_epoch = res[deepest_key(res)]["top1"], st.epoch
            _save(cfg, c, run, st, window, "best.pt")
    rec["selected_on"] = "val" if c.data.val is not None else ("test" if selector is not None else "none")
    st.history.append({"epoch": st.epoch, "best_metric": st.best_metric})
    run.log(rec)
    if st.epoch % cfg.checkpoint.every_epochs == 0 or st.epoch == cfg.schedule.epochs:
        _save(cfg, c, run, st, window, "last.pt")
    if c.info.is_main:
        tqdm.write(epoch_line(st, cfg.schedule.epochs, rec.get("select"), run.last_train, pace))


def epoch_line(st: TrainState, epochs: int, select: dict | None, train: dict | None = None,
               pace: tuple = ()) -> str:
    """One line per epoch, for a terminal or a batch job's log: the last window's loss and rate, every exit's
    validation top-1, the best so far, the time this process has run and the time left at its pace."""
    parts = [f"epoch {st.epoch}/{epochs}", f"step {st.step}"]
    if train:
        parts.append(f"loss {train['loss']:.4f}  {train['img_per_s']:.0f} img/s")
    if select:
        parts.append("val top-1 " + " ".join(f"{k} {v['top1']:.2f}" for k, v in select.items()))
        parts.append(f"best {st.best_metric:.2f} (epoch {st.best_epoch})")
    if pace and st.step > pace[1]:
        elapsed = time.perf_counter() - pace[0]
        left = elapsed / (st.step - pace[1]) * max(pace[2] - st.step, 0)
        parts.append(f"{_hms(elapsed)} elapsed, {_hms(left)} left")
    return "  ".join(parts)


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _save_inside_window(cfg: Config, c: Components, run: RunDir, st: TrainState, window: Window, params,
                        asked: bool, buffers: tuple) -> None:
    """last.pt between logging boundaries: the open window is checked first (every rank reaches the same step, so
    the read's all-reduce is collective) and travels in the checkpoint."""
    if window.n:
        raise_if_diverged(window.read(params, c.info, asked, buffers), st, cfg.checkpoint.dir)
    _save(cfg, c, run, st, window, "last.pt")


def _save(cfg: Config, c: Components, run: RunDir, st: TrainState, window: Window, name: str) -> None:
    st.saved[name] = [st.epoch, st.step]
    if not c.info.is_main:
        return
    ck = {"model": unwrap(c.model).state_dict(), "optimizer": c.optimizer.state_dict(),
          "scaler": c.scaler.state_dict(), "objective": c.objective.state_dict(),
          "ema": c.ema.module.state_dict() if c.ema is not None else None, "rng": rng_state(),
          "state": vars(st).copy(), "config": to_dict(cfg), "class_names": c.data.class_names,
          "normalisation": c.data.normalisation,
          "records": dict(run.counts), "window": window.state_dict()}
    atomic_save(ck, Path(cfg.checkpoint.dir) / name)
