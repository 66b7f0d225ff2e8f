"""The training loop. Nothing inside the step reads a device value on the host: the loss terms are summed on
device and read every `logging.log_every` steps, where a non-finite value stops the run before any checkpoint
could capture it.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state, unwrap
from engine.config import Config, to_dict
from engine.distributed import barrier, cleanup
from engine.evaluate import autocast, deepest_key, evaluate
from engine.optim import lr_at, set_lr
from engine.rundir import RunDir
from engine.setup_run import Components, build_components


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # batches of `epoch` already trained
    step: int = 0  # optimizer steps so far
    best_metric: float = -1.0
    best_epoch: int = 0  # 1-based epoch of the best validation score; 0 = none selected
    history: list = field(default_factory=list)  # per-epoch eval summaries


class StopFlag:
    """SIGTERM / Ctrl-C request a clean stop at the end of the current step (checked on the host, no sync)."""

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
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, on_step: Optional[Callable[[int], bool]] = None, device: str | None = None) -> dict:
    """Train one run. `on_step(step) -> True` requests a stop like SIGTERM does (used by tests)."""
    c = build_components(cfg, device)
    run = RunDir(cfg.checkpoint.dir, cfg, enabled=c.info.is_main)
    state = TrainState()
    if cfg.checkpoint.resume:
        state = _resume(cfg, c)
    try:
        with StopFlag() as stop:
            finished = _loop(cfg, c, run, state, stop, on_step)
        summary = _finish(cfg, c, run, state) if finished else {"interrupted": True, "epoch": state.epoch,
                                                                   "batch": state.batch, "step": state.step}
        run.write_json("summary.json", summary)
        return summary
    finally:
        run.close()
        cleanup()


def _loop(cfg: Config, c: Components, run: RunDir, st: TrainState, stop: StopFlag, on_step) -> bool:
    loader, model, opt = c.data.train, c.train_model, c.optimizer
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is larger than the training shard "
                         f"({loader.num_samples} samples): no full batch")
    names: list[str] = []
    acc, n_acc, t0 = None, 0, time.perf_counter()
    bar = tqdm(total=steps_per_epoch * cfg.schedule.epochs, initial=st.step, disable=not (
        c.info.is_main and cfg.logging.progress), dynamic_ncols=True, unit="step")
    model.train()
    for epoch in range(st.epoch, cfg.schedule.epochs):
        st.epoch = epoch
        loader.set_epoch(epoch, st.batch)
        for batch in loader:
            set_lr(opt, lr_at(st.step, steps_per_epoch, cfg.optim.lr, cfg.schedule))
            with autocast(c.info.device, cfg.precision.amp):
                loss, _ = c.objective(model, batch)
            opt.zero_grad(set_to_none=True)
            c.scaler.scale(loss.total).backward()
            if cfg.optim.clip_grad_norm > 0:
                c.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(c.model.parameters(), cfg.optim.clip_grad_norm)
            c.scaler.step(opt)
            c.scaler.update()
            c.objective.after_step(c.model, st.step)
            if c.ema is not None:
                c.ema.update(c.model, st.step)
            vals = torch.stack([loss.total.detach()] + [v.detach() for v in loss.terms.values()])
            names = names or ["loss"] + list(loss.terms)
            acc = vals.float() if acc is None else acc + vals.float()
            n_acc += 1
            st.step, st.batch = st.step + 1, st.batch + 1
            bar.update(1)
            if st.step % cfg.logging.log_every == 0 or st.batch == steps_per_epoch:
                _flush(run, bar, st, names, acc / n_acc, n_acc * len(batch) * c.info.world, t0, opt)
                acc, n_acc, t0 = None, 0, time.perf_counter()
            if stop.requested or (on_step is not None and on_step(st.step)):
                if acc is not None:
                    _check_finite(names, (acc / n_acc).tolist(), st)
                _save(cfg, c, st, "last.pt")
                bar.close()
                return False
        st.batch = 0
        st.epoch = epoch + 1
        _end_of_epoch(cfg, c, run, st)
    bar.close()
    return True


def _check_finite(names: list[str], values: list[float], st: TrainState) -> None:
    bad = [n for n, v in zip(names, values) if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise TrainingDiverged(f"non-finite loss ({', '.join(bad)}) at epoch {st.epoch}, step {st.step}; stopping. "
                               "The last good checkpoint is untouched; lower optim.lr or use precision.amp=bf16.")


def _flush(run: RunDir, bar, st: TrainState, names, mean: torch.Tensor, images: int, t0: float, opt) -> None:
    values = mean.tolist()  # the one host read per log interval
    _check_finite(names, values, st)
    rate = images / max(time.perf_counter() - t0, 1e-9)
    rec = {"kind": "train", "epoch": st.epoch, "step": st.step, "lr": opt.param_groups[0]["lr"],
           "img_per_s": round(rate, 1), **{n: v for n, v in zip(names, values)}}
    run.log(rec)
    bar.set_postfix(loss=f"{values[0]:.4f}", img_s=f"{rate:.0f}")


def _eval_model(cfg: Config, c: Components):
    return c.ema.module if (c.ema is not None and cfg.ema.eval) else c.model


def _end_of_epoch(cfg: Config, c: Components, run: RunDir, st: TrainState) -> None:
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
            _save(cfg, c, st, "best.pt")
    rec["selected_on"] = "val" if c.data.val is not None else ("test" if selector is not None else "none")
    st.history.append({"epoch": st.epoch, "best_metric": st.best_metric})
    run.log(rec)
    if st.epoch % cfg.checkpoint.every_epochs == 0 or st.epoch == cfg.schedule.epochs:
        _save(cfg, c, st, "last.pt")


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
    if c.info.is_main:  # reliability diagram + per-exit accuracy chart (PNG) into the run directory
        from engine.plots import write_run_plots

        summary["plots"] = write_run_plots(cfg.checkpoint.dir, summary)
    run.log({"kind": "final", **summary})
    return summary


def _save(cfg: Config, c: Components, st: TrainState, name: str) -> None:
    if not c.info.is_main:
        return
    ck = {"model": unwrap(c.model).state_dict(), "optimizer": c.optimizer.state_dict(),
          "scaler": c.scaler.state_dict(), "objective": c.objective.state_dict(),
          "ema": c.ema.module.state_dict() if c.ema is not None else None, "rng": rng_state(),
          "state": vars(st).copy(), "config": to_dict(cfg), "class_names": c.data.class_names}
    atomic_save(ck, Path(cfg.checkpoint.dir) / name)


def _resume(cfg: Config, c: Components) -> TrainState:
    path = Path(cfg.checkpoint.resume)
    if cfg.checkpoint.resume == "auto":
        path = Path(cfg.checkpoint.dir) / "last.pt"
        if not path.is_file():
            return TrainState()
    ck = load_checkpoint(path, c.info.device)
    c.model.load_state_dict(ck["model"])
    c.optimizer.load_state_dict(ck["optimizer"])
    c.scaler.load_state_dict(ck["scaler"])
    c.objective.load_state_dict(ck["objective"])
    if c.ema is not None and ck.get("ema") is not None:
        c.ema.module.load_state_dict(ck["ema"])
    set_rng_state(ck["rng"])
    return TrainState(**ck["state"])
