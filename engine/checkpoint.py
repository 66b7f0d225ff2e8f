"""Checkpoints: atomic writes, loading with one clear error, comparing a checkpoint's config with the run's, and
rebuilding the model a checkpoint holds.

A write goes to `<name>.tmp` beside the target, is fsynced and renamed over it: a crash mid-write leaves the
previous checkpoint intact, and a temp file that a kill left behind has a fixed name, so the next run in the
directory removes it (`engine.rundir`). A failed write (full disk, permissions) raises `CheckpointError` naming the
file and the OS error.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import Config, config_from_dict, to_dict
from engine.config_files import flatten, migrate
from engine.models import MultiExitModel, create_model

TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read, or used with this config; the message names the file."""


def temp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


class _KeepOSError:
    """File wrapper that remembers an OSError from `write`: torch.save turns it into an internal assertion
    ("enforce fail at inline_container.cc ... unexpected pos") that names neither the disk nor the file."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # the error that got us here is the one to report
        path.unlink()


@contextlib.contextmanager
def _ctrl_c_held():
    """A Ctrl-C inside torch.save surfaces as a RuntimeError from its C++ writer ("enforce fail at
    inline_container.cc"), an exit 1. So SIGINT waits for the write: the handler that was in place (the training
    loop's StopFlag, whose second Ctrl-C raises KeyboardInterrupt) runs once the file is whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def atomic_save(obj: Any, path: str | Path) -> None:
    with _ctrl_c_held():
        _atomic_save(obj, path)


def _atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = temp_path(path)
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
            writer = _KeepOSError(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException as e:
        _remove(tmp)
        cause = writer.error if writer is not None and writer.error is not None else e
        if isinstance(cause, OSError):
            kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
            raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}{kept}") from cause
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({reason})") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise CheckpointError(f"{path} is not a selfdistill checkpoint (no 'model' weights and 'config')")
    return ck


def config_diff(saved: dict, current: dict, ignore: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> list[str]:
    """'key: saved vs current' for every config leaf that differs. `ignore` / `only` hold keys or section
    prefixes ('logging.'); a key missing on one side (an older checkpoint) counts as its default, and a key that
    moved or was retired since the checkpoint was saved is read at its new place (config_files.migrate)."""
    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)

    defaults = flatten(to_dict(Config()))
    a, b = flatten(migrate(copy.deepcopy(saved))), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if under(key, ignore) or (only and not under(key, only)):
            continue
        va, vb = a.get(key, defaults.get(key)), b.get(key, defaults.get(key))
        if va != vb:
            out.append(f"{key} {va!r} vs {vb!r}")
    return out


def load_weights(model: torch.nn.Module, state: dict, path: str | Path, saved_cfg: dict, cfg: Config) -> None:
    """`model.load_state_dict(state)`, or a `CheckpointError` that names the architecture keys that differ."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        diff = config_diff(saved_cfg, to_dict(cfg), only=("model.", "exits."))
        what = ("; ".join(diff) + " (checkpoint vs now)") if diff else str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit the model: {what}") from None


def model_from_checkpoint(ck: dict, overrides: list[str] = (), weights: str = "model",
                          path: str = "the checkpoint") -> tuple[MultiExitModel, Config]:
    """The run's model with `ck[weights]` loaded ('model', or 'ema' for the EMA weights), on CPU, and its config."""
    cfg = config_from_dict(ck["config"], overrides)
    state = ck.get(weights)
    if state is None:
        raise CheckpointError(f"{path} has no '{weights}' weights")
    model = create_model(cfg.model, cfg.exits)
    load_weights(model, state, path, ck["config"], cfg)
    return model, cfg


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP and torch.compile wrappers so state-dict keys never carry `module.` / `_orig_mod.`."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
