"""The training loop. Nothing inside the step reads a device value on the host: the loss terms and the gradient
norm are summed on device and read at the logging boundary (`engine.monitor`), every `logging.log_every` steps, at
the end of each epoch and before every checkpoint, so a non-finite value stops the run before a checkpoint holds it.

Stopping: SIGTERM / Ctrl-C ask for a stop. A single process stops after the current step; under DDP the request
travels with the next boundary's all-reduce and every rank stops at that step. `last.pt` then holds everything a
resume needs, including the logging window cut by the stop, so the resumed run logs exactly what an uninterrupted
one would.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from engine.checkpoint import atomic_save, load_checkpoint, rng_state, unwrap
from engine.config import Config, ConfigError, to_dict
from engine.distributed import all_gather_object, barrier, cleanup
from engine.evaluate import autocast, deepest_key, evaluate
from engine.monitor import TrainingDiverged, Window
from engine.optim import lr_at, set_lr
from engine.resume import open_run, restore
from engine.rundir import RunDir
from engine.setup_run import Components, build_components

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


class StopFlag:
    """SIGTERM / Ctrl-C request a clean stop (a host flag, no sync); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, on_step: Optional[Callable[[int], bool]] = None, device: str | None = None) -> dict:
    """Train one run. `on_step(step) -> True` requests a stop like SIGTERM does (used by tests)."""
    ck = open_run(cfg)  # refuses, or loads and checks the checkpoint to resume, before anything is written
    c = build_components(cfg, device)
    run = None
    try:
        state, window = TrainState(), Window(scaler_skips=c.scaler.is_enabled())
        if ck:
            restore(c, ck, cfg)  # a state that does not fit stops the run here, still before any write
            state = TrainState(**ck["state"])
            if ck.get("window"):
                window.load_state_dict(ck["window"], c.info.device)
        # Resuming cuts the metrics back to what the checkpoint had seen (all of them when there is none yet).
        records = None if ck is None else (ck.get("records") if ck else {"jsonl": 0, "csv": 0})
        run = RunDir(cfg.checkpoint.dir, cfg, enabled=c.info.is_main, records=records,
                     overwrite=cfg.checkpoint.overwrite and ck is None)
        with StopFlag() as stop:
            finished = _loop(cfg, c, run, state, window, stop, on_step)
        summary = _finish(cfg, c, run, state) if finished else {"interrupted": True, "epoch": state.epoch,
                                                                   "batch": state.batch, "step": state.step}
        run.write_json("summary.json", summary)
        barrier(c.info)  # no rank exits (and makes torchrun stop the others) while rank 0 still writes
        return summary
    finally:
        if run is not None:
            run.close()
        cleanup()


def _step(cfg: Config, c: Components, batch, step: int, steps_per_epoch: int):
    set_lr(c.optimizer, lr_at(step, steps_per_epoch, cfg.optim.lr, cfg.schedule))
    with autocast(c.info.device, cfg.precision.amp):
        loss, _ = c.objective(c.train_model, batch)
    c.optimizer.zero_grad(set_to_none=True)
    c.scaler.scale(loss.total).backward()
    c.scaler.unscale_(c.optimizer)  # no-op unless fp16: the norm and the clipping see the true gradients
    params = [p for p in c.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if cfg.optim.clip_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_grad_norm, grad_norm)
    c.scaler.step(c.optimizer)
    c.scaler.update()
    c.objective.after_step(c.model, step)
    if c.ema is not None:
        c.ema.update(c.model, step)
    return loss, grad_norm


def _loop(cfg: Config, c: Components, run: RunDir, st: TrainState, window: Window, stop: StopFlag, on_step) -> bool:
    loader = c.data.train
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training shard "
                          f"({loader.num_samples} samples): no full batch")
    bar = tqdm(total=steps_per_epoch * cfg.schedule.epochs, initial=st.step, disable=not (
        c.info.is_main and cfg.logging.progress), dynamic_ncols=True, unit="step")
    params = list(c.model.parameters())
    asked = False
    c.train_model.train()
    for epoch in range(st.epoch, cfg.schedule.epochs):
        st.epoch = epoch
        loader.set_epoch(epoch, st.batch)
        for batch in loader:
            loss, grad_norm = _step(cfg, c, batch, st.step, steps_per_epoch)
            window.add(loss, grad_norm)
            st.step, st.batch = st.step + 1, st.batch + 1
            bar.update(1)
            asked = asked or stop.requested or (on_step is not None and on_step(st.step))
            agreed = False
            if st.step % cfg.logging.log_every == 0 or st.batch == steps_per_epoch:
                agreed = _flush(cfg, c, run, bar, st, window, params, asked)
            if agreed or (asked and not c.info.enabled):
                if window.n:  # a single process stopping inside a window: check it, keep it in last.pt
                    _check(cfg, st, window.read(params, c.info, asked))
                _save(cfg, c, run, st, window, "last.pt")
                bar.close()
                return False
        st.batch = 0
        st.epoch = epoch + 1
        _end_of_epoch(cfg, c, run, st, window)
    bar.close()
    return True


def _check(cfg: Config, st: TrainState, reading) -> None:
    """Every checkpoint is written right after a healthy reading, so each one written so far is good."""
    if not reading.problems:
        return
    run = Path(cfg.checkpoint.dir)
    good = "; ".join(f"{run / name} (epoch {e}, step {s})" for name, (e, s) in sorted(st.saved.items()))
    raise TrainingDiverged(f"non-finite {', '.join(reading.problems)} at epoch {st.epoch}, step {st.step}; "
                           + (f"the last good checkpoint: {good}" if good else "no checkpoint was written yet")
                           + ". Lower optim.lr, set optim.clip_grad_norm, or use precision.amp=bf16.")


def _flush(cfg: Config, c: Components, run: RunDir, bar, st: TrainState, window: Window, params, asked: bool) -> bool:
    """Read and log the window; returns whether any rank asked to stop."""
    reading = window.read(params, c.info, asked)
    _check(cfg, st, reading)
    rate = window.n * cfg.data.batch_size * c.info.world / max(time.perf_counter() - window.t0, 1e-9)
    run.log({"kind": "train", "epoch": st.epoch, "step": st.step, "lr": c.optimizer.param_groups[0]["lr"],
             "img_per_s": round(rate, 1), **reading.values})
    bar.set_postfix(loss=f"{reading.values['loss']:.4f}", img_s=f"{rate:.0f}")
    window.reset()
    return reading.stop


def _eval_model(cfg: Config, c: Components):
    return c.ema.module if (c.ema is not None and cfg.ema.eval) else c.model


def _end_of_epoch(cfg: Config, c: Components, run: RunDir, st: TrainState, window: Window) -> None:
    selector = c.data.val if c.data.val is not None else (c.data.test if cfg.data.select_on_test else None)
    rec: dict = {"kind": "eval", "epoch": st.epoch, "step": st.step}
    model = _eval_model(cfg, c)
    if selector is not None:
        # Recall@1 gathers every pooled feature across ranks: once at the end, not every epoch.
        res = evaluate(model, selector, c.info.device, cfg.precision.amp, cfg.logging.ece_bins, c.info, recall=False)
        metric = res[deepest_key(res)]["top1"]
        rec["select"] = {k: v for k, v in res.items() if not k.startswith("_")}
        if metric > st.best_metric:
            st.best_metric, st.best_epoch = metric, st.epoch
            _save(cfg, c, run, st, window, "best.pt")
    rec["selected_on"] = "val" if c.data.val is not None else ("test" if selector is not None else "none")
    st.history.append({"epoch": st.epoch, "best_metric": st.best_metric})
    run.log(rec)
    if st.epoch % cfg.checkpoint.every_epochs == 0 or st.epoch == cfg.schedule.epochs:
        _save(cfg, c, run, st, window, "last.pt")


def _skipped_files(c: Components) -> list[str]:
    """Unreadable images skipped under data.skip_corrupt, by every rank and split."""
    mine = set()
    for loader in (c.data.train, c.data.val, c.data.test):
        mine |= set(getattr(loader, "skipped_files", ()))
    return sorted(set().union(*all_gather_object(sorted(mine), c.info)))


def _finish(cfg: Config, c: Components, run: RunDir, st: TrainState) -> dict:
    """Last-epoch test figures and, when a model was selected, the best-validation checkpoint's, side by side."""
    summary: dict = {"epochs": cfg.schedule.epochs, "steps": st.step, "best_epoch": st.best_epoch,
                     "best_val_top1": st.best_metric, "run_dir": str(cfg.checkpoint.dir)}
    test = c.data.test
    if test is not None:
        last = evaluate(_eval_model(cfg, c), test, c.info.device, cfg.precision.amp, cfg.logging.ece_bins, c.info)
        summary["test_last"] = last
        best_path = Path(cfg.checkpoint.dir) / "best.pt"
        if st.best_epoch > 0:
            barrier(c.info)
            ck = load_checkpoint(best_path, c.info.device)
            key = "ema" if (c.ema is not None and cfg.ema.eval) else "model"
            target = _eval_model(cfg, c)
            live = {k: v.clone() for k, v in target.state_dict().items()}
            target.load_state_dict(ck[key])
            summary["test_best"] = evaluate(target, test, c.info.device, cfg.precision.amp, cfg.logging.ece_bins,
                                            c.info)
            target.load_state_dict(live)
    skipped = _skipped_files(c)
    if skipped:
        summary["skipped_files"] = skipped
    if c.info.is_main:  # reliability diagram + per-exit accuracy chart (PNG) into the run directory
        from engine.plots import write_run_plots

        summary["plots"] = write_run_plots(cfg.checkpoint.dir, summary)
    run.log({"kind": "final", **summary})
    return summary


def _save(cfg: Config, c: Components, run: RunDir, st: TrainState, window: Window, name: str) -> None:
    st.saved[name] = [st.epoch, st.step]
    if not c.info.is_main:
        return
    ck = {"model": unwrap(c.model).state_dict(), "optimizer": c.optimizer.state_dict(),
          "scaler": c.scaler.state_dict(), "objective": c.objective.state_dict(),
          "ema": c.ema.module.state_dict() if c.ema is not None else None, "rng": rng_state(),
          "state": vars(st).copy(), "config": to_dict(cfg), "class_names": c.data.class_names,
          "records": dict(run.counts), "window": window.state_dict()}
    atomic_save(ck, Path(cfg.checkpoint.dir) / name)
