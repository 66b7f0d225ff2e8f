"""The end of a run: test figures of the last epoch and of the best-validation checkpoint side by side, the images
skipped as unreadable, and the run's plots."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from engine.checkpoint import load_checkpoint
from engine.config import Config
from engine.distributed import all_gather_object, barrier
from engine.evaluate import evaluate
from engine.rundir import RunDir
from engine.setup_run import Components


def eval_model(cfg: Config, c: Components) -> nn.Module:
    return c.ema.module if (c.ema is not None and cfg.ema.eval) else c.model


def final_summary(cfg: Config, c: Components, run: RunDir, steps: int, best_epoch: int, best_metric: float) -> dict:
    summary: dict = {"epochs": cfg.schedule.epochs, "steps": steps, "best_epoch": best_epoch,
                     "best_val_top1": best_metric, "run_dir": str(cfg.checkpoint.dir)}
    model, test = eval_model(cfg, c), c.data.test
    if test is not None:
        summary["test_last"] = evaluate(model, test, c.info.device, cfg.precision.amp, cfg.logging.ece_bins, c.info)
        if best_epoch > 0:
            barrier(c.info)
            best = load_checkpoint(Path(cfg.checkpoint.dir) / "best.pt", c.info.device)
            live = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best["ema" if model is not c.model else "model"])
            summary["test_best"] = evaluate(model, test, c.info.device, cfg.precision.amp, cfg.logging.ece_bins,
                                            c.info)
            model.load_state_dict(live)
    loaders = (c.data.train, c.data.val, c.data.test)  # unreadable images skipped under data.skip_corrupt
    mine = sorted({f for loader in loaders for f in getattr(loader, "skipped_files", ())})
    skipped = sorted(set().union(*all_gather_object(mine, c.info)))  # by every rank
    if skipped:
        summary["skipped_files"] = skipped
    if c.objective.kernel_checks:  # the fused loss's checks at first use; meta.json gets them too
        summary["kernel_self_check"] = c.objective.kernel_checks
        run.update_meta({"kernel_self_check": c.objective.kernel_checks})
    if c.info.is_main:  # reliability diagram + per-exit accuracy chart (PNG) into the run directory
        from engine.plots import write_run_plots  # matplotlib: imported at the end only, for start-up time

        summary["plots"] = write_run_plots(cfg.checkpoint.dir, summary)
    run.log({"kind": "final", **summary})
    return summary
