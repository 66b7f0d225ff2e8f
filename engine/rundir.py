"""The run directory: resolved config, provenance (git commit, versions), metrics as JSON lines and CSV."""
from __future__ import annotations

import csv
import json
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.checkpoint import atomic_write_text
from engine.config import dump_yaml

PACKAGES = ("torch", "triton", "numpy", "nvidia-dali-cuda130", "timm", "scikit-learn", "pillow", "liger-kernel")


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


class RunDir:
    """Only the main rank writes; other ranks get a RunDir whose writes are no-ops."""

    def __init__(self, path: str | Path, cfg, enabled: bool = True, extra_meta: dict | None = None):
        self.path, self.enabled = Path(path), enabled
        self._csv_fields: list[str] | None = None
        self._tb = None
        if not enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dump_yaml(cfg), self.path / "config.yaml")
        atomic_write_text(json.dumps(provenance(extra_meta), indent=2), self.path / "meta.json")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") \
                    from None
            self._tb = SummaryWriter(str(self.path / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("kind") == "train":
            self._csv(record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time", "epoch"):
                    self._tb.add_scalar(f"{record.get('kind', 'x')}/{k}", v, record.get("step", 0))

    def _csv(self, record: dict) -> None:
        path = self.path / "metrics.csv"
        if self._csv_fields is None:
            if path.exists():  # resumed run: keep the existing header
                with open(path) as f:
                    self._csv_fields = next(csv.reader(f), None)
            if not self._csv_fields:
                self._csv_fields = list(record)
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(self._csv_fields)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, self._csv_fields, extrasaction="ignore").writerow(record)

    def write_json(self, name: str, obj: Any) -> None:
        if self.enabled:
            atomic_write_text(json.dumps(obj, indent=2), self.path / name)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
