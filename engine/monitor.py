"""The logging boundary: the one place where the training loop reads device values on the host.

Each step adds its loss terms and gradient norm to sums kept on the device (no sync). Every `logging.log_every`
steps, at the end of each epoch and before any checkpoint, one host read returns the window's means, whether a
loss, gradient norm or parameter is non-finite, and, in the same all-reduce under DDP, whether any rank was asked
to stop: every rank then sees the same values and stops at the same step. `StopFlag` turns SIGTERM / Ctrl-C into
that request; `raise_if_diverged` names the last good checkpoint.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from engine.distributed import DistInfo
from engine.types import LossOutput


class TrainingDiverged(RuntimeError):
    pass


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


@dataclass
class Reading:
    values: dict  # window means: loss, each term, grad_norm (None when the fp16 scaler skipped every step)
    problems: list[str]  # what was non-finite; empty when the window is healthy
    stop: bool  # some rank asked to stop


class Window:
    """Sums over the steps since the last boundary. `scaler_skips`: fp16's GradScaler skips steps whose gradients
    overflow, so a non-finite gradient norm there is routine, not divergence."""

    def __init__(self, scaler_skips: bool = False):
        self.scaler_skips = scaler_skips
        self.names: list[str] = []
        self.sum: Tensor | None = None
        self.n = 0
        self.t0 = time.perf_counter()

    def add(self, loss: LossOutput, grad_norm: Tensor) -> None:
        finite = torch.isfinite(grad_norm)
        vals = torch.stack([loss.total.detach().float(), *(v.detach().float() for v in loss.terms.values()),
                            torch.where(finite, grad_norm, 0.0).float(), finite.float()])
        self.names = self.names or ["loss", *loss.terms]
        self.sum = vals if self.sum is None else self.sum + vals
        self.n += 1

    def read(self, params: list[Tensor], info: DistInfo, stop_requested: bool,
             buffers: tuple[Tensor, ...] = ()) -> Reading:
        """`buffers`: the model's floating buffers (BatchNorm's running statistics), which a checkpoint saves too."""
        device = self.sum.device
        bad_params = torch.stack([~torch.isfinite(p).all() for p in params]).sum().float()
        bad_buffers = torch.stack([~torch.isfinite(b).all() for b in buffers]).sum().float() if buffers \
            else torch.zeros((), device=device)
        flags = torch.stack([bad_params, bad_buffers.to(device), torch.tensor(float(stop_requested), device=device)])
        vec = torch.cat([self.sum, flags])
        if info.enabled:
            dist.all_reduce(vec)
        host = vec.tolist()  # the host read
        steps = self.n * info.world
        k = len(self.names)
        values = {name: host[i] / steps for i, name in enumerate(self.names)}
        gn_sum, gn_count, params_bad, buffers_bad, stops = host[k:]
        values["grad_norm"] = gn_sum / gn_count if gn_count else None
        problems = [f"loss ({name})" for name in self.names if not math.isfinite(values[name])]
        if gn_count < steps and not self.scaler_skips:
            problems.append("gradient norm")
        if params_bad:
            problems.append("parameters")
        if buffers_bad:
            problems.append("buffers (BatchNorm running statistics)")
        return Reading(values, problems, stops > 0)

    def reset(self) -> None:
        self.sum, self.n, self.t0 = None, 0, time.perf_counter()

    def state_dict(self) -> dict:
        """A window cut by a stop travels in the checkpoint, so the resumed run logs the same record."""
        return {"names": self.names, "n": self.n, "sum": None if self.sum is None else self.sum.detach().cpu()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.names, self.n = list(state["names"]), state["n"]
        self.sum = None if state["sum"] is None else state["sum"].to(device)
        self.t0 = time.perf_counter()


def raise_if_diverged(reading: Reading, state, run_dir: str) -> None:
    """`state` has the loop's epoch, step and `saved` checkpoints. Every checkpoint is written right after a healthy
    reading, so each one written so far is good."""
    if not reading.problems:
        return
    good = "; ".join(f"{Path(run_dir) / name} (epoch {e}, step {s})" for name, (e, s) in sorted(state.saved.items()))
    raise TrainingDiverged(f"non-finite {', '.join(reading.problems)} at epoch {state.epoch}, step {state.step}; "
                           + (f"the last good checkpoint: {good}" if good else "no checkpoint was written yet")
                           + ". Lower optim.lr, set optim.clip_grad_norm, or use precision.amp=bf16.")
