"""The measuring half of `selfdistill bench kernels`: one shape (`Case`) against every provider and mode, its
inputs, the providers' losses (eager, torch.compile, Liger-Kernel, the fused kernel), timing, peak memory and CUDA-graph
replays. Each measurement is a `Row`; `Row.json()` is its form in the report's JSON."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from bench.measure import cuda_graph_fn, median_p20_p80
from engine.config import ByotConfig
from engine.objectives.byot import ByotWeights, byot_options
from engine.objectives.functional import hint_loss
from kernels import choose_interpreter
from kernels.multi_exit.options import LossOptions
from kernels.multi_exit.reference import multi_exit_loss_reference

PROVIDERS = ("eager", "compile", "compile-ro", "liger", "fused")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

@dataclass(frozen=True)
class Case:
    E: int
    B: int
    C: int
    D: int
    dtype: str

    def label(self) -> str:
        return f"E={self.E} B={self.B} C={self.C} {self.dtype}"

    def io_bytes(self) -> int:
        """Logits and features once, in the input dtype: what a forward must read and a backward must write."""
        return self.E * self.B * (self.C + self.D) * DTYPES[self.dtype].itemsize


MEASURED = ("ms_p50", "ms_p20", "ms_p80", "gbps", "copy_fraction", "peak_mem_gib", "peak_mem_over_grads", "loss",
            "abs_diff_vs_eager")


@dataclass
class Row:
    """One provider in one mode on one shape. The measured fields are set when `status` is "ok"; the kernel's own
    traffic and the speed-ups over the other providers only on the fused provider's rows."""
    case: Case
    provider: str
    mode: str
    status: str
    ms_p50: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    gbps: Optional[float] = None
    copy_fraction: Optional[float] = None
    peak_mem_gib: Optional[float] = None  # None off CUDA
    peak_mem_over_grads: Optional[float] = None
    loss: Optional[float] = None
    abs_diff_vs_eager: Optional[float] = None
    kernel_gbps: Optional[float] = None
    kernel_copy_fraction: Optional[float] = None
    speedups: dict[str, Optional[float]] = field(default_factory=dict)  # provider -> its ms / this row's ms
    graph: dict[str, Any] = field(default_factory=dict)  # graph_status, and graph_ms_* and host_ms when replayed

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def key(self) -> tuple:
        return self.case.E, self.case.B, self.case.C, self.case.dtype, self.mode, self.provider

    def json(self) -> dict[str, Any]:
        out = dict(asdict(self.case), provider=self.provider, mode=self.mode, status=self.status)
        if self.ok:
            out.update({k: getattr(self, k) for k in MEASURED})
        if self.kernel_gbps is not None:
            out.update(kernel_gbps=self.kernel_gbps, kernel_copy_fraction=self.kernel_copy_fraction)
        return {**out, **self.graph, **{f"speedup_vs_{p}": v for p, v in self.speedups.items()}}


# Bytes moved, in units of io_bytes: `useful` is what any implementation must read (fwd) and write (bwd); `kernel`
# is the fused kernels' compulsory traffic, the backward reading the inputs again to recompute the gradients.
TRAFFIC = {"useful": {"fwd": 1, "bwd": 1, "fwd+bwd": 2}, "kernel": {"fwd": 1, "bwd": 2, "fwd+bwd": 3}}


def make_inputs(case: Case, device: torch.device) -> tuple[list, list, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    dt = DTYPES[case.dtype]
    logits = [(torch.randn(case.B, case.C, generator=g, device=device) * 3).to(dt) for _ in range(case.E)]
    feats = [torch.randn(case.B, case.D, generator=g, device=device).relu().to(dt) for _ in range(case.E)]
    y = torch.randint(0, case.C, (case.B,), generator=g, device=device)
    y[::16] = -100
    return logits, feats, y


def liger_loss(opts) -> Callable | str:
    """Liger's CE and KL-div kernels composed per exit, or why not."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss  # optional dependency
    except ImportError:
        return "not installed"
    ce, kl = LigerCrossEntropyLoss(ignore_index=-100), LigerKLDIVLoss(reduction="batchmean")
    T, scale = opts.temperature, opts.temperature ** 2 if opts.t_squared else 1.0

    def fn(z, f, y):
        p = F.softmax(z[-1].detach().float() / T, -1)
        total = z[0].new_zeros((), dtype=torch.float32)
        # KL and hints first: Liger's CE stores its gradient into its input logits (Liger-Kernel issue 272)
        for i in range(len(z) - 1):
            total = total + opts.kd_weight[i] * scale * kl(F.log_softmax(z[i].float() / T, -1), p)
            if f and opts.hint_weight[i]:
                total = total + opts.hint_weight[i] * hint_loss(f[i], f[-1], opts.hint)
        for i in range(len(z)):
            total = total + opts.ce_weight[i] * ce(z[i], y)
        return total

    return fn


def loss_fns(providers: list[str], device: torch.device, compile_backend: str) -> dict[str, Callable | str]:
    """For each provider, a factory from loss options to a loss function of (logits, features, labels), or a
    status string saying why it cannot run."""
    def eager(opts):
        return lambda z, f, y: multi_exit_loss_reference(z, y, features=f or None, dtype=torch.float32,
                                                         **opts.as_kwargs()).sum()

    compiled: dict[tuple, Callable] = {}

    def compiled_fn(mode: Optional[str]):
        def factory(opts):
            functorch_config.donated_buffer = False  # the bwd mode replays one graph's retained backward
            if (mode, opts) not in compiled:
                compiled[mode, opts] = torch.compile(eager(opts), dynamic=False, mode=mode, backend=compile_backend)
            fn = compiled[mode, opts]
            if mode != "reduce-overhead":
                return fn
            # one training step per call: the outputs of the previous replay may be overwritten
            return lambda z, f, y: (torch.compiler.cudagraph_mark_step_begin(), fn(z, f, y))[1]

        return factory

    def fused(opts):
        from kernels.multi_exit.op import fused_loss  # triton, optional: only where the fused provider runs

        return lambda z, f, y: fused_loss(z, y, opts, features=f or None)[0]

    table = {"eager": eager, "compile": compiled_fn(None), "compile-ro": compiled_fn("reduce-overhead"),
             "liger": liger_loss if device.type == "cuda" else "n/a: Liger's kernels run on CUDA only",
             "fused": fused if fused_runs(device) else "unavailable: CPU needs TRITON_INTERPRET=1"}
    return {p: table[p] for p in providers}


def fused_runs(device: torch.device) -> bool:
    """Whether the fused kernel can run here: compiled on CUDA, or on CPU in Triton's interpreter."""
    return choose_interpreter(device.type == "cuda") or device.type == "cuda"


def bench(fn: Callable[[], Any], device: torch.device, args, grads: list[torch.Tensor]) -> list[float]:
    """[median, p20, p80] ms per call; `grads` are reset before every call."""
    if device.type == "cuda":
        import triton.testing  # optional dependency: do_bench, on CUDA only

        return list(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grads,
                                            quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up, and the interpreter's first-call set-up
    times = []
    for _ in range(args.repeats):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return median_p20_p80(times)


def copy_bandwidth(device: torch.device, args) -> float:
    """GB/s of a device tensor copy, counting the read and the write (--copy-gbps: given, not measured)."""
    if getattr(args, "copy_gbps", None):
        return args.copy_gbps
    n = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / (bench(lambda: dst.copy_(src), device, args, [])[0] * 1e-3) / 1e9


def mode_fn(mode: str, loss: Callable, z, f, y) -> Callable[[], Any]:
    if mode == "fwd":
        return lambda: loss(z, f, y)
    if mode == "fwd+bwd":
        return lambda: loss(z, f, y).backward()
    out = loss(z, f, y)
    return lambda: out.backward(retain_graph=True)


def peak_memory(loss: Callable, z, f, y, device: torch.device) -> Optional[int]:
    """Peak bytes allocated by one fwd+bwd beyond the inputs (CUDA only)."""
    if device.type != "cuda":
        return None
    for t in z + f:
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss(z, f, y).backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def byot_defaults(num_exits: int, hint: bool = True) -> LossOptions:
    """The fused call of BYOT with the engine's defaults (objective.byot), without a hint when there are no
    features."""
    b = ByotConfig() if hint else ByotConfig(hint="none")
    return byot_options(b, ByotWeights.from_config(b, num_exits))


def _error(e: Exception) -> str:
    return f"error: {type(e).__name__}: {str(e)[:300]}"


def measure_case(case: Case, device: torch.device, args, fns: dict, copy_gbps: float,
                 flush: Callable[[list[Row]], None]) -> list[Row]:
    """Every provider x mode on one shape; `flush(rows so far)` after each provider."""
    opts = byot_defaults(case.E, hint=bool(case.D))
    logits, feats, y = make_inputs(case, device)
    rows: list[Row] = []
    ref_loss = None
    for provider, factory in fns.items():
        flush(rows)
        loss = factory(opts) if callable(factory) else factory
        if isinstance(loss, str):
            rows += [Row(case, provider, m, loss) for m in args.modes]
            continue
        # every provider gets its own copies: Liger's CE overwrites its input logits with their gradient
        z = [t.detach().clone().requires_grad_(True) for t in logits]
        f = [t.detach().clone().requires_grad_(True) for t in feats] if case.D else []
        try:
            value = loss(z, f, y).detach().double()
            ref_loss = value if provider == "eager" else ref_loss
            mem = peak_memory(loss, z, f, y, device)
        except Exception as e:  # noqa: BLE001 - one failing provider must not lose the others' numbers
            rows += [Row(case, provider, m, _error(e)) for m in args.modes]
            continue
        for mode in args.modes:
            try:
                med, p20, p80 = bench(mode_fn(mode, loss, z, f, y), device, args, z + f)
            except Exception as e:  # noqa: BLE001
                rows.append(Row(case, provider, mode, _error(e)))
                continue
            gbps = case.io_bytes() * TRAFFIC["useful"][mode] / (med * 1e-3) / 1e9
            row = Row(case, provider, mode, "ok", ms_p50=med, ms_p20=p20, ms_p80=p80, gbps=gbps,
                      copy_fraction=gbps / copy_gbps, peak_mem_gib=None if mem is None else mem / 2**30,
                      peak_mem_over_grads=None if mem is None else mem / case.io_bytes(), loss=value.item(),
                      abs_diff_vs_eager=None if ref_loss is None else abs(value - ref_loss).item())
            if provider == "fused":
                row.kernel_gbps = case.io_bytes() * TRAFFIC["kernel"][mode] / (med * 1e-3) / 1e9
                row.kernel_copy_fraction = row.kernel_gbps / copy_gbps
            if args.graphs:
                row.graph = graph_fields(provider, mode, mode_fn(mode, loss, z, f, y), device, args, z + f, med)
            rows.append(row)
    flush(rows)
    return rows


def graph_fields(provider: str, mode: str, fn: Callable[[], Any], device: torch.device, args,
                 grads: list[torch.Tensor], ms: float) -> dict[str, Any]:
    """`fn` replayed from a CUDA graph: its median/p20/p80 ms (device time alone) and host_ms (do_bench's median
    minus the replay's), or why there is no replay."""
    if device.type != "cuda" or mode == "bwd" or provider == "compile-ro":
        return {"graph_status": "n/a: " + ("CUDA graphs need a GPU" if device.type != "cuda" else
                                           "a retained backward is not replayed" if mode == "bwd" else
                                           "reduce-overhead replays its own CUDA graphs")}

    def drop_grads() -> None:  # the captured backward then allocates its gradients from the graph's pool
        for t in grads:
            t.grad = None

    try:
        drop_grads()
        fn()  # first-call uploads and autotuning stay outside the check
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            return {"graph_status": f"n/a: syncs with the host ({str(e).splitlines()[0][:160]})"}
        finally:
            torch.cuda.set_sync_debug_mode(0)
        p50, p20, p80 = bench(cuda_graph_fn(fn, before_capture=drop_grads), device, args, [])
    except Exception as e:  # noqa: BLE001 - a failed capture must not lose the row
        return {"graph_status": _error(e)}
    return {"graph_status": "ok", "graph_ms_p50": p50, "graph_ms_p20": p20, "graph_ms_p80": p80, "host_ms": ms - p50}


