"""The run directory: resolved config, provenance (git commit, versions), metrics as JSON lines and CSV.

A run directory belongs to one run. `check_run_dir` refuses to start a second run in it (unless asked to
overwrite) before anything is written; a resumed run cuts the metrics back to the records its checkpoint had
seen, so a run interrupted at any point and resumed logs exactly the records of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.checkpoint import TMP_SUFFIX, atomic_write_text
from engine.config import dump_yaml

PACKAGES = ("torch", "triton", "numpy", "nvidia-dali-cuda130", "timm", "scikit-learn", "pillow", "liger-kernel")
RUN_MARKERS = ("last.pt", "best.pt", "metrics.jsonl", "summary.json")  # a directory holding one of these has a run
CSVS = {"csv": "metrics.csv", "eval_csv": "metrics_eval.csv"}  # counts key -> file: train and validation records
# removed by checkpoint.overwrite
RUN_FILES = (*RUN_MARKERS, *CSVS.values(), "reliability.png", "exit_accuracy.png", "curves.png")


class RunDirError(RuntimeError):
    """The run directory cannot be used (holds another run, cannot be written); the message names it."""


def git_commit(cwd: Path | None = None) -> str:
    try:
        where = cwd or Path(__file__).parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(extra: dict | None = None) -> dict[str, Any]:
    return {"commit": git_commit(), "versions": versions(), "argv": sys.argv, "host": socket.gethostname(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})}


@contextlib.contextmanager
def run_lock(path: str | Path, enabled: bool = True):
    """One writer per run directory: an exclusive lock on `<dir>/.lock`, held while the run lives. A second process
    aimed at the same directory (a second `train`, a second `--resume auto`) stops at once with a RunDirError
    instead of interleaving checkpoints and metrics. The OS drops the lock when its process dies, even by SIGKILL,
    so a killed run never leaves the directory locked."""
    if not enabled:
        yield
        return
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        f = open(path / ".lock", "a+")
    except OSError:  # a file in the way or no permission: check_run_dir names the problem, with no lock to take
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunDirError(f"run directory {path} is in use by another run (pid {holder}); wait for it to end, "
                              "or choose another checkpoint.dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def check_run_dir(path: str | Path, resuming: bool, overwrite: bool) -> None:
    """Before anything is written: never start over a run silently, and fail early on a directory we cannot write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"checkpoint.dir {path} is a file, not a directory")
    found = [n for n in RUN_MARKERS if (path / n).exists()]
    if found and not resuming and not overwrite:
        raise RunDirError(f"run directory {path} already holds a run ({', '.join(found)}); continue it with "
                          "--resume auto, or choose a new checkpoint.dir (checkpoint.overwrite=true replaces it)")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write the run directory {path}: {probe} is not writable (permission denied); "
                          "choose another checkpoint.dir")


def _complete_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return path.read_text().split("\n")[:-1]  # a line cut by a kill has no newline yet: dropped


def _keep_lines(path: Path, n: int) -> int:
    """Cut `path` back to its first `n` complete lines (0: remove it); returns the lines it now holds."""
    lines = _complete_lines(path)
    if n <= 0:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return 0
    keep = lines[:n]
    if keep != lines or (path.is_file() and not path.read_text().endswith("\n")):
        atomic_write_text("".join(line + "\n" for line in keep), path)
    return len(keep)


def _flat_scalars(record: dict, prefix: str = ""):
    for k, v in record.items():
        if isinstance(v, dict):
            yield from _flat_scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


class RunDir:
    """Only the main rank writes; other ranks get a RunDir whose writes are no-ops.

    `records` ({"jsonl": n, "csv": m}, from the checkpoint a run resumes) cuts the metrics back to what that
    checkpoint had seen; `overwrite` removes a previous run's files first. Any OS error while writing becomes a
    `RunDirError` naming the file."""

    def __init__(self, path: str | Path, cfg, enabled: bool = True, extra_meta: dict | None = None,
                 records: dict | None = None, overwrite: bool = False):
        self.path, self.enabled = Path(path), enabled
        self._csv_fields: dict[str, list[str]] = {}
        self.last_train: dict = {}
        self._tb = None
        self.counts = {"jsonl": 0, **{k: 0 for k in CSVS}}
        if not enabled:
            return
        with self._guard(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            # left by a kill during a write; never a file anyone needs. Both patterns match a hidden file on some
            # Pythons, so each is removed once
            for tmp in {*self.path.glob(f"*{TMP_SUFFIX}"), *self.path.glob(f".*{TMP_SUFFIX}")}:
                tmp.unlink(missing_ok=True)
            if overwrite:
                for name in RUN_FILES:
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / name).unlink()
            jsonl = self.path / "metrics.jsonl"
            if records is not None:
                _keep_lines(jsonl, records.get("jsonl", 0))
                for key, name in CSVS.items():  # a header line, then one row per record
                    n = records.get(key, 0)
                    _keep_lines(self.path / name, n + 1 if n else 0)
            self.counts = {"jsonl": len(_complete_lines(jsonl)),
                           **{k: max(len(_complete_lines(self.path / n)) - 1, 0) for k, n in CSVS.items()}}
            atomic_write_text(dump_yaml(cfg), self.path / "config.yaml")
            atomic_write_text(json.dumps(provenance(extra_meta), indent=2), self.path / "meta.json")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency: tensorboard
            except ImportError:
                raise RunDirError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                  "(or set logging.tensorboard=false)") from None
            self._tb = SummaryWriter(str(self.path / "tb"))

    @contextlib.contextmanager
    def _guard(self, where: Path):
        try:
            yield
        except OSError as e:
            name = e.filename or where
            raise RunDirError(f"cannot write {name} in the run directory {self.path}: {e.strerror or e}") from e

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        if record.get("kind") == "train":
            self.last_train = record  # the epoch's console line quotes its loss and rate
        with self._guard(self.path / "metrics.jsonl"):
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.counts["jsonl"] += 1
            if record.get("kind") == "train":
                self._csv(record, "csv")
            elif record.get("kind") == "eval" and record.get("select"):  # one column per exit and metric
                self._csv({"time": record["time"], "epoch": record["epoch"], "step": record["step"],
                           **{f"val_{k}_{m}": v for k, ms in record["select"].items() for m, v in ms.items()}},
                          "eval_csv")
        if self._tb is not None:  # nested records (an eval's exits) become select/exit0/top1, ...
            for k, v in _flat_scalars(record):
                if k not in ("step", "time", "epoch"):
                    self._tb.add_scalar(f"{record.get('kind', 'x')}/{k}", v, record.get("step", 0))

    def _csv(self, record: dict, key: str) -> None:
        path = self.path / CSVS[key]
        if key not in self._csv_fields:
            fields = None
            if path.exists():  # resumed run: keep the existing header
                with open(path) as f:
                    fields = next(csv.reader(f), None)
            if not fields:
                fields = list(record)
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(fields)
            self._csv_fields[key] = fields
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, self._csv_fields[key], extrasaction="ignore").writerow(record)
        self.counts[key] += 1

    def update_meta(self, extra: dict) -> None:
        """Add keys to meta.json (written whole again, atomically)."""
        if not self.enabled:
            return
        path = self.path / "meta.json"
        with self._guard(path):
            meta = json.loads(path.read_text()) if path.is_file() else {}
            atomic_write_text(json.dumps({**meta, **extra}, indent=2), path)

    def write_json(self, name: str, obj: Any) -> None:
        if self.enabled:
            with self._guard(self.path / name):
                atomic_write_text(json.dumps(obj, indent=2), self.path / name)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
