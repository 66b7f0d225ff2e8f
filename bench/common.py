"""Shared measurement and reporting helpers of `bench/`: timing, FLOP counting, device/NVML info, report folders.

Timing. On CUDA every figure comes from CUDA events recorded on the current stream after warm-up (which absorbs
torch.compile, cudnn.benchmark autotuning and CUDA-graph capture), read after one synchronize per repeat. On CPU
`time.perf_counter`. Each repeat gives one value; reports show mean ± std over repeats (airbench, DLE habits).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add; matmuls and convolutions only,
forward and backward as run). GMACs = FLOPs / 2e9, the unit timm and the papers use.

Reports go to `bench/results/<name>-<date>-<device>/` (or --out): report.json (with provenance: commit, versions,
date, argv, device), report.md, PNG plots. JSON numbers are finite or null, never NaN.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------- devices


def resolve_device(name: Optional[str] = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    return dev


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "cpu": platform.processor() or
                            platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        info.update(name=p.name, index=idx, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 2), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info["name"] = f"cpu ({info['cpu']}, {info['cpu_count']} cores)"
    return info


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


# --------------------------------------------------------------------------------------------- statistics


@dataclass
class Stats:
    """mean ± std (sample std, 0 for one value) over repeats; `values` keeps every repeat."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def to_dict(self, digits: int = 6) -> dict[str, Any]:
        r = lambda v: round(v, digits)  # noqa: E731
        return {"mean": r(self.mean), "std": r(self.std), "min": r(min(self.values)), "max": r(max(self.values)),
                "n": len(self.values), "values": [r(v) for v in self.values]}

    def fmt(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def fmt_num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


# --------------------------------------------------------------------------------------------- timing


class StepTimer:
    """Elapsed time of a code region: CUDA events on GPU (read later, no sync inside), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pairs: list[tuple[Any, Any]] = []
        self._open: Any = None

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open = ev
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            ev = time.perf_counter()
        self._pairs.append((self._open, ev))
        self._open = None

    def seconds(self) -> list[float]:
        """Every region's duration; on GPU this synchronizes on the last event."""
        if self.cuda:
            if self._pairs:
                self._pairs[-1][1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self._pairs]
        return [b - a for a, b in self._pairs]

    def reset(self) -> None:
        self._pairs.clear()


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, iters: int = 10, repeats: int = 3
            ) -> Stats:
    """Milliseconds per call of `fn`: `warmup` untimed calls, then `repeats` x `iters` timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call = []
    for _ in range(repeats):
        timer = StepTimer(device)
        timer.start()
        for _ in range(iters):
            fn()
        timer.stop()
        per_call.append(timer.seconds()[0] * 1e3 / iters)
    return Stats(per_call)


def cuda_graph_fn(fn: Callable[[], Any], warmup: int = 3, before_capture: Callable[[], Any] = lambda: None
                  ) -> Callable[[], Any]:
    """Capture `fn` (static inputs it closes over) into a CUDA graph; returns a replay callable.
    Warm-up runs on a side stream first, as the CUDA-graphs recipe requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# --------------------------------------------------------------------------------------------- FLOPs / params


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of everything `fn(*args, **kwargs)` runs (including a backward it calls), via FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def count_params(module: nn.Module) -> int:
    """Distinct parameters: `parameters()` yields a tensor shared under two names (an alias) once."""
    return sum(p.numel() for p in module.parameters())


def gmacs(flops: Optional[int]) -> Optional[float]:
    return None if flops is None else flops / 2e9


# --------------------------------------------------------------------------------------------- NVML


class NvmlSampler:
    """Samples SM/memory clocks, power, memory used, utilisation and temperature in a background thread.

    Never raises: without pynvml, without an NVIDIA driver, or on a CPU device, `status` says why and every summary
    is empty. Use `mark()` before and after a measurement and `summary(t0, t1)` for that window.
    """

    FIELDS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "memory_used_gib", "gpu_util_pct", "temp_c")

    def __init__(self, device: torch.device, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.static: dict[str, Any] = {}
        self.status = "not started"
        self._nvml: Any = None
        self._handle: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if device.type != "cuda":
            self.status = "unavailable: not a CUDA device"
            return
        try:
            import pynvml
        except ImportError:
            self.status = "unavailable: pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._find_handle(pynvml, device)
            self.static = self._static_info()
            self.status = "ok"
        except Exception as e:  # noqa: BLE001 - NVMLError_* and friends: report, never crash a benchmark
            self.status = f"unavailable: NVML failed: {type(e).__name__}: {e}"
            self._nvml = None

    @staticmethod
    def _find_handle(pynvml: Any, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:  # robust to CUDA_VISIBLE_DEVICES reordering
            dom, dev = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(f"{dom:08x}:{bus:02x}:{dev:02x}.0".encode())
            except Exception:  # noqa: BLE001
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(idx)

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - a field a GPU/driver/MIG mode does not support
            return None

    def _static_info(self) -> dict[str, Any]:
        n, h = self._nvml, self._handle

        def dec(v: Any) -> Any:
            return v.decode() if isinstance(v, bytes) else v

        limit = self._call(lambda: n.nvmlDeviceGetPowerManagementLimit(h))
        return {"name": dec(self._call(lambda: n.nvmlDeviceGetName(h))),
                "driver": dec(self._call(n.nvmlSystemGetDriverVersion)),
                "max_sm_clock_mhz": self._call(lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM)),
                "max_mem_clock_mhz": self._call(lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_MEM)),
                "power_limit_w": None if limit is None else limit / 1000,
                "memory_total_gib": self._call(lambda: n.nvmlDeviceGetMemoryInfo(h).total / 2**30)}

    def _sample(self) -> dict[str, Any]:
        n, h = self._nvml, self._handle
        power = self._call(lambda: n.nvmlDeviceGetPowerUsage(h))
        return {"t": time.perf_counter(),
                "sm_clock_mhz": self._call(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                "mem_clock_mhz": self._call(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),
                "power_w": None if power is None else power / 1000,
                "memory_used_gib": self._call(lambda: n.nvmlDeviceGetMemoryInfo(h).used / 2**30),
                "gpu_util_pct": self._call(lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
                "temp_c": self._call(lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "NvmlSampler":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    def mark() -> float:
        return time.perf_counter()

    def summary(self, t0: float = -math.inf, t1: float = math.inf) -> dict[str, Any]:
        rows = [s for s in list(self.samples) if t0 <= s["t"] <= t1]
        out: dict[str, Any] = {"status": self.status, "samples": len(rows)}
        for f in self.FIELDS:
            vals = [r[f] for r in rows if r.get(f) is not None]
            out[f] = {"mean": round(statistics.fmean(vals), 2), "min": round(min(vals), 2),
                      "max": round(max(vals), 2)} if vals else None
        return out


# --------------------------------------------------------------------------------------------- model loading


def build_bench_model(checkpoint: Optional[str], config: Optional[str], overrides: Sequence[str] = (),
                      weights: str = "model") -> tuple[nn.Module, Any, dict[str, Any]]:
    """(MultiExitModel on CPU in eval mode, Config, source info). From a checkpoint (its config + weights, with
    `overrides` on top; weights='ema' picks the EMA weights) or, without one, random init from YAML + overrides."""
    from engine.checkpoint import load_checkpoint, model_from_checkpoint
    from engine.config import load_config
    from engine.models import create_model

    if checkpoint:
        ck = load_checkpoint(checkpoint, "cpu")
        try:
            model, cfg = model_from_checkpoint(ck, list(overrides), weights)
        except ValueError as e:
            raise ValueError(f"{checkpoint}: {e}") from None
        source = {"mode": "checkpoint", "checkpoint": str(checkpoint), "weights": weights,
                  "class_names": ck.get("class_names")}
    else:
        cfg = load_config(config, list(overrides))
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, cfg.exits)
        source = {"mode": "random-init", "config": config, "overrides": list(overrides)}
    return model.eval(), cfg, source


# --------------------------------------------------------------------------------------------- reports


# Written by `make gpu-prep` before the tree travels to a machine where it arrives without .git (bench/GPU.md).
COMMIT_STAMP = Path(__file__).resolve().parents[1] / ".whl" / "COMMIT"


def commit(stamp: Path = COMMIT_STAMP) -> str:
    """git's commit where there is a .git; else the stamp, marked as such; else "unknown"."""
    from engine.rundir import git_commit

    found = git_commit()
    if found == "unknown" and stamp.is_file() and stamp.read_text().strip():
        return f"{stamp.read_text().strip()} (stamped by make gpu-prep)"
    return found


def provenance(device: torch.device, extra: Optional[dict] = None) -> dict[str, Any]:
    from engine.rundir import provenance as run_provenance

    return {**run_provenance({"device": device_info(device), **(extra or {})}), "commit": commit()}


def default_out_dir(name: str, device: torch.device, root: Path = RESULTS_DIR) -> Path:
    """bench/results/<name>-<UTC date>-<device>/; a second run the same day gets -2, -3, ... (never overwrites)."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    base = root / f"{name}-{date}-{device_slug(device)}"
    path, i = base, 2
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, Paths/devices/dtypes -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Stats):
        return _clean(obj.to_dict())
    return str(obj)


@dataclass
class Report:
    """One report folder: `payload` -> report.json, `markdown` -> report.md, `figures` name -> draw(fig)."""

    name: str
    payload: dict[str, Any]
    markdown: str
    figures: dict[str, Callable[[Any], None]] = field(default_factory=dict)

    def write(self, out_dir: Path) -> dict[str, str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        written, plot_errors = {}, {}
        for fname, draw in self.figures.items():
            try:
                written[fname] = str(save_figure(draw, out_dir / fname))
            except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
                plot_errors[fname] = f"{type(e).__name__}: {e}"
        payload = dict(self.payload, files={"json": "report.json", "markdown": "report.md",
                                            "plots": sorted(Path(p).name for p in written.values())})
        if plot_errors:
            payload["plot_errors"] = plot_errors
        (out_dir / "report.json").write_text(json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")
        md = self.markdown
        if written:
            md += "\n## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in written.values()) + "\n"
        if plot_errors:
            md += "\nPlots not drawn: " + "; ".join(f"{k}: {v}" for k, v in plot_errors.items()) + "\n"
        (out_dir / "report.md").write_text(md)
        return {"dir": str(out_dir), "json": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md"),
                **written}


def save_figure(draw: Callable[[Any], None], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 4.5), dpi=110)
    try:
        draw(fig)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def provenance_md(prov: dict[str, Any]) -> str:
    d = prov.get("device", {})
    vers = ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())
    return (f"- device: {d.get('name', d.get('type'))}\n- commit: `{prov.get('commit')}`\n- date (UTC): "
            f"{prov.get('date')}\n- versions: {vers}\n- command: `{' '.join(prov.get('argv', []))}`\n")


# --------------------------------------------------------------------------------------------- CLI helpers


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    return [int(t) for t in csv_list(text)]


def float_list(text: str) -> list[float]:
    return [float(t) for t in csv_list(text)]


def check_choices(flag: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"{flag}: {', '.join(bad)} not allowed; choose from {', '.join(allowed)}")


def cpu_note(device: torch.device) -> str:
    return ("" if device.type == "cuda" else
            "> **CPU run.** These figures measure this CPU only. They are no estimate of GPU performance, and the "
            "GPU targets of the issue are not evaluated.\n\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
