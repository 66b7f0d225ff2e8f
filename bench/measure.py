"""Measuring on CPU and GPU: the timer, mean ± std over repeats, CUDA-graph replays, the NVML sampler, the device-op
counter and the endless batch stream, shared by `selfdistill profile exits` and the bench commands (bench/README.md
says how things are measured)."""
from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(values: list[float], digits: int = 6) -> dict[str, Any]:
    """mean ± std (sample std; 0 for one value) over repeats, with every repeat's value."""
    r = lambda v: round(v, digits)  # noqa: E731
    return {"mean": r(statistics.fmean(values)), "std": r(statistics.stdev(values) if len(values) > 1 else 0.0),
            "min": r(min(values)), "max": r(max(values)), "n": len(values), "values": [r(v) for v in values]}


def median_p20_p80(times: list[float]) -> list[float]:
    """The quantiles `triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8])` reports, for times taken on the host."""
    q = statistics.quantiles(times * (2 if len(times) == 1 else 1), n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7]]


class Timer:
    """Durations of code regions, each between two `mark()`s: CUDA events on GPU (nothing waits until `seconds()`),
    perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        self.marks.append(torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter())
        if self.cuda:
            self.marks[-1].record()

    def seconds(self) -> list[float]:
        pairs = list(zip(self.marks[::2], self.marks[1::2]))
        if self.cuda and pairs:
            pairs[-1][1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, repeats: int) -> list[float]:
    """Milliseconds per call of `fn`, one value per repeat of `iters` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    timer = Timer(device)
    for _ in range(repeats):
        timer.mark()
        for _ in range(iters):
            fn()
        timer.mark()
    return [s * 1e3 / iters for s in timer.seconds()]


def cuda_graph_fn(fn: Callable[[], Any], warmup: int = 3, before_capture: Callable[[], Any] = lambda: None
                  ) -> Callable[[], Any]:
    """`fn` (with the static inputs it closes over) captured in a CUDA graph; returns the replay. The warm-up runs
    on a side stream first, as the CUDA-graphs recipe requires."""
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


class NvmlSampler:
    """SM/memory clocks, power, memory used, utilisation and temperature, sampled every 0.1 s in a thread.

    Never raises: without pynvml, without a driver or on a CPU device, `status` says why and summaries are empty.
    `summary(t0, t1)` covers the samples between two `time.perf_counter()` readings.
    """

    FIELDS = {"sm_clock_mhz": lambda n, h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
              "mem_clock_mhz": lambda n, h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
              "power_w": lambda n, h: n.nvmlDeviceGetPowerUsage(h) / 1000,
              "memory_used_gib": lambda n, h: n.nvmlDeviceGetMemoryInfo(h).used / 2**30,
              "gpu_util_pct": lambda n, h: n.nvmlDeviceGetUtilizationRates(h).gpu,
              "temp_c": lambda n, h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)}
    STATIC = {"name": lambda n, h: n.nvmlDeviceGetName(h), "driver": lambda n, h: n.nvmlSystemGetDriverVersion(),
              "max_sm_clock_mhz": lambda n, h: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM),
              "max_mem_clock_mhz": lambda n, h: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_MEM),
              "power_limit_w": lambda n, h: n.nvmlDeviceGetPowerManagementLimit(h) / 1000,
              "memory_total_gib": lambda n, h: n.nvmlDeviceGetMemoryInfo(h).total / 2**30}

    def __init__(self, device: torch.device):
        self.samples, self.static, self._stop = [], {}, threading.Event()
        self._nvml = self._handle = self._thread = None
        self.status = "unavailable: not a CUDA device"
        if device.type != "cuda":
            return
        try:
            import pynvml  # optional dependency (nvidia-ml-py)
        except ImportError:
            self.status = "unavailable: pynvml is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            index = device.index or torch.cuda.current_device()
            p = torch.cuda.get_device_properties(index)
            try:  # by PCI bus, whatever order CUDA_VISIBLE_DEVICES gives
                bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
                self._handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
            except Exception:  # noqa: BLE001
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml, self.status = pynvml, "ok"
            self.static = {k: self._read(f) for k, f in self.STATIC.items()}
        except Exception as e:  # noqa: BLE001 - NVMLError_* and friends: reported, never a crash
            self.status = f"unavailable: NVML failed: {type(e).__name__}: {e}"

    def _read(self, field: Callable) -> Any:
        try:
            v = field(self._nvml, self._handle)
            return v.decode() if isinstance(v, bytes) else v
        except Exception:  # noqa: BLE001 - a field this GPU, driver or MIG mode does not report
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append({"t": time.perf_counter(), **{k: self._read(f) for k, f in self.FIELDS.items()}})
            self._stop.wait(0.1)

    def __enter__(self) -> "NvmlSampler":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._read(lambda n, h: n.nvmlShutdown())

    def summary(self, t0: float = -math.inf, t1: float = math.inf) -> dict[str, Any]:
        rows = [s for s in list(self.samples) if t0 <= s["t"] <= t1]
        out: dict[str, Any] = {"status": self.status, "samples": len(rows)}
        for f in self.FIELDS:
            vals = [r[f] for r in rows if r[f] is not None]
            out[f] = {k: round(g(vals), 2) for k, g in (("mean", statistics.fmean), ("min", min), ("max", max))} \
                if vals else None
        return out


# aten ops that move no data: allocation without initialisation, views, metadata
FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "select",
            "slice", "unbind", "expand", "as_strided", "detach", "alias", "t", "transpose", "permute", "unsqueeze",
            "squeeze", "_reshape_alias", "reshape", "lift_fresh", "split", "chunk", "set_"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it that touch memory, and the bytes allocated by the free ones."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE_OPS:
            if name.startswith(("empty", "new_empty")):
                self.allocated += out.numel() * out.element_size()
        else:
            self.ops.append(name)
        return out


def endless(loader: Any) -> Iterator[Any]:
    """The loader's batches across epochs, as the training loop sees them."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        n = 0
        for n, batch in enumerate(loader, 1):
            yield batch
        if n == 0:
            raise RuntimeError("the loader yields no batch (batch larger than the data?)")
