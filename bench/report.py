"""What every report command shares (`selfdistill profile exits` and `selfdistill bench ...`): the base parser, the
report folder, the provenance block and the report writer with its tables and figures. bench/README.md describes the
report folders."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Optional, Sequence

import torch

from engine.rundir import git_commit
from engine.rundir import provenance as run_provenance

_REPO = Path(__file__).resolve().parents[1]
# Every report command writes under ./bench/results of the working directory by default: in a clone, the committed
# results folder (bench/README.md lists what it holds); after a pip install, never inside site-packages.
RESULTS_DIR = Path("bench") / "results"
# Written by `make gpu-prep` before the tree travels to a machine where it arrives without .git (bench/GPU.md).
COMMIT_STAMP = _REPO / ".whl" / "COMMIT"


def base_parser(prog: str, doc: str, repeats: int = 3) -> argparse.ArgumentParser:
    """The options every report command has; each command adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 avoids OpenMP "
                                               "spinning on a shared machine")
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats (reports: mean ± std over them)")
    p.add_argument("--out", help="report folder (default: a new ./bench/results/<name>-<date>-<device>/ of the "
                   "working directory)")
    p.add_argument("--no-plots", action="store_true")
    return p


def start(args: argparse.Namespace, name: str) -> tuple[torch.device, Path]:
    """The device and the report folder of a parsed command line; sets the CPU threads."""
    if args.repeats < 1:
        fail("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return device, Path(args.out) if args.out else default_out_dir(name, device)


def resolve_device(name: Optional[str] = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(name).type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


def commit(stamp: Path = COMMIT_STAMP) -> str:
    """git's commit where there is a .git; else the stamp, marked as such; else "unknown"."""
    found = git_commit()
    if found == "unknown" and stamp.is_file() and stamp.read_text().strip():
        return f"{stamp.read_text().strip()} (stamped by make gpu-prep)"
    return found


def provenance(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        index = device.index or torch.cuda.current_device()
        p = torch.cuda.get_device_properties(index)
        info.update(name=p.name, index=index, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 2), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info["name"] = f"cpu ({info['cpu']}, {info['cpu_count']} cores)"
    return {**run_provenance({"device": info}), "commit": commit()}


def provenance_md(prov: dict[str, Any]) -> str:
    d = prov["device"]
    note = ("" if d["type"] == "cuda" else "> **CPU run.** These figures measure this CPU only. They are no estimate "
            "of GPU performance, and the GPU targets are not evaluated.\n\n")
    vers = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    return (f"{note}- device: {d['name']}, 1-min load average {d['load_avg_1min']}\n- commit: `{prov['commit']}`\n"
            f"- date (UTC): {prov['date']}\n- versions: {vers}\n- command: `{' '.join(prov['argv'])}`\n")


def default_out_dir(name: str, device: torch.device, root: Path = RESULTS_DIR) -> Path:
    """./bench/results/<name>-<UTC date>-<device>/ (absolute); a second run the same day gets -2, -3, ... (never
    overwrites)."""
    slug = "cpu" if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower())
    base = root.absolute() / f"{name}-{datetime.now(timezone.utc):%Y-%m-%d}-{slug.strip('-')}"
    path, i = base, 2
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, anything else unknown -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj if isinstance(obj, (str, int, bool)) or obj is None else str(obj)


def write_report(out_dir: Path, payload: dict[str, Any], markdown: str,
                 figures: Optional[dict[str, Callable[[Any], None]]] = None, stem: str = "report") -> dict[str, str]:
    """<stem>.json, <stem>.md and the figures (file name -> draw(fig)); a plot that fails loses no number."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, errors = [], {}
    for name, draw in (figures or {}).items():
        try:
            import matplotlib  # optional dependency: only the plots need it

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(8, 4.5), dpi=110)
            try:
                draw(fig)
                fig.tight_layout()
                fig.savefig(out_dir / name)
                written.append(name)
            finally:
                plt.close(fig)
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = dict(payload, files={"json": js.name, "markdown": md.name, "plots": sorted(written)},
                   **({"plot_errors": errors} if errors else {}))
    js.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")
    md.write_text(markdown + "".join(f"\n![{Path(n).stem}]({n})\n" for n in written) +
                  "".join(f"\nPlot {k} not drawn: {v}\n" for k, v in errors.items()))
    return {"dir": str(out_dir), "json": str(js), "markdown": str(md)}


def lines(series: dict[str, list[tuple]], xlabel: str, ylabel: str, title: str = "", log: str = "",
          hline: Optional[float] = None) -> Callable[[Any], None]:
    """A figure of one line per named series of (x, y) or (x, y, point label) points; `log` names the log-scaled
    axes ("x", "xy")."""
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        for label, pts in series.items():
            if pts:
                pts = sorted(pts, key=lambda p: p[:2])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                for p in (p for p in pts if len(p) > 2):
                    ax.annotate(str(p[2]), p[:2], textcoords="offset points", xytext=(3, 3), fontsize=6)
        if hline is not None:
            ax.axhline(hline, ls="--", color="grey")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale="log" if "x" in log else "linear",
               yscale="log" if "y" in log else "linear")
        ax.legend(fontsize=7)

    return draw


def bars(labels: list[str], groups: dict[str, list[float]], ylabel: str, title: str = "") -> Callable[[Any], None]:
    """A figure of grouped bars: one group of len(groups) bars per label."""
    def draw(fig: Any) -> None:
        fig.set_size_inches(max(8, 0.4 * len(labels) * len(groups)), 4.5)
        ax, width = fig.add_subplot(111), 0.8 / len(groups)
        for i, (name, values) in enumerate(groups.items()):
            ax.bar([x + (i - (len(groups) - 1) / 2) * width for x in range(len(labels))], values, width, label=name)
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=30 if len(labels) > 6 else 0, ha="right")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(ylabel=ylabel, title=title)
        ax.legend(fontsize=7)

    return draw


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "(none)") -> str:
    body = ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    head = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(head + body) + "\n" if body else empty + "\n"


def fmt(v: Any) -> str:
    """A table cell: n/a for a missing value, 4 significant digits for a float."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def csv_list(text: str, kind: type = str, allowed: Sequence = (), flag: str = "") -> list:
    """A comma list; with `flag`, an empty list is refused, and with `allowed` any other value."""
    values = [kind(t.strip()) for t in text.split(",") if t.strip()]
    bad = [str(v) for v in values if allowed and v not in allowed]
    if bad or (flag and not values):
        fail(f"{flag}: {', '.join(bad)} not allowed; choose from {', '.join(allowed)}" if bad else
             f"{flag}: give at least one value")
    return values


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(msg: str) -> NoReturn:
    """A bad command line: one line, exit code 2, as argparse does."""
    log(f"error: {msg}")
    raise SystemExit(2)
