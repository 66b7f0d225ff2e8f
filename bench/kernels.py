"""`selfdistill bench kernels`: the fused multi-exit loss against eager PyTorch, torch.compile and Liger-Kernel.

    selfdistill bench kernels [--device auto|cuda|cpu] [--exits 2,4] [--batch 64,256,1024]
                              [--classes 10,100,1000,32000] [--dtypes fp32,bf16] [--modes fwd,bwd,fwd+bwd]
                              [--providers eager,compile,compile-ro,liger,fused] [--feature-dim 512]
                              [--extra 4x4096x32000] [--graphs] [--copy-gbps X] [--compile-backend inductor]
                              [--warmup-ms 25] [--rep-ms 100] [--quick] [--out DIR]
    selfdistill bench kernels --host-overhead [--device ...] [--out DIR]
    (= python3 -m bench.kernels ...; on a GPU: python3 -m bench.kernels --device cuda [--quick])

The loss is BYOT's (engine defaults: CE at every exit with weight 1 - alpha, KL(deepest / T || exit_i / T) * T^2
with weight alpha, T = 3, masked-sse hints on pooled [B, D] features with weight beta), on E exits of [B, C] logits
plus features, one labelled row in 16 ignored. Providers, timed side by side on the same inputs in one run:
    eager    kernels.reference.multi_exit_loss_reference in fp32 (the tests' reference; F.cross_entropy, softmax, KL)
    compile  the same function under torch.compile(dynamic=False): static shapes, one compile per shape (donated
             backward buffers off, since the bwd mode replays a retained graph)
    compile-ro  the same with mode="reduce-overhead" (torch.compile's own CUDA graphs)
    liger    Liger-Kernel composed per exit: LigerKLDIVLoss on log_softmax(z/T) and LigerCrossEntropyLoss, torch
             hints ("not installed" when liger-kernel is missing: pip install liger-kernel; CUDA only)
    fused    kernels.multi_exit_loss.fused_loss, backpropagated through its total as the objectives do
The options of every provider come from engine.objectives.fused.loss_options, as in training.
Modes: fwd (forward with autograd recording), bwd (backward of a retained graph), fwd+bwd.
--host-overhead instead reports the host side of the BYOT objective's fused forward + backward (bench/host_overhead.py:
host_us with the two launches stubbed, and `launches`, every device operation that touches memory) next to the eager
reference's.

GPU timing: triton.testing.do_bench, median and p20/p80 (ms), L2 flushed between calls. With --graphs the fwd and
fwd+bwd calls are also captured in a CUDA graph and its replays timed the same way: the replay is device time
alone, so `ms - graph ms` is what the host adds (launches, Python, autograd). A provider that syncs with the host
(found by running it once under torch.cuda.set_sync_debug_mode("error")) cannot be captured and says so.
Two bandwidths, both as GB/s and as a fraction of a device-to-device tensor copy (read + write; measured here, or
--copy-gbps from an earlier measurement):
    useful   the bytes any implementation must move: fwd reads logits and features once, bwd writes their
             gradients once, fwd+bwd both (the same yardstick for every provider)
    kernel   the compulsory traffic of the fused design (every buffer its kernels read or write, once): how close
             the kernels run to the copy roofline, whatever the design costs on top of `useful`
Peak memory is measured once per shape (fwd+bwd, beyond the inputs) in GiB and as a multiple of the gradient bytes.
Each shape also records |provider - eager| on the loss, so a figure never comes from a broken kernel.
CPU: perf_counter with tiny default shapes; the fused kernel runs in the Triton interpreter (TRITON_INTERPRET=1 is
set when nothing imported the kernels yet), so its CPU times are a smoke test, not a measurement.
Reports: bench/results/kernels-<date>-<device>/ (report.json, report.md, PNG plots), rewritten after every provider
so a run stopped early keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from bench.common import (
    Report,
    check_choices,
    cpu_note,
    csv_list,
    default_out_dir,
    int_list,
    log,
    md_table,
    provenance,
    provenance_md,
    resolve_device,
)

PROVIDERS = ("eager", "compile", "compile-ro", "liger", "fused")
BASELINES = ("eager", "compile", "compile-ro", "liger")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTILES = [0.5, 0.2, 0.8]
GPU_SWEEP = dict(exits="2,4", batch="64,256,1024", classes="10,100,1000,32000", dtypes="fp32,bf16",
                 extra="4x4096x32000")
QUICK_GPU_SWEEP = dict(exits="4", batch="256,1024", classes="1000,32000", dtypes="bf16", extra="4x4096x32000")
CPU_SWEEP = dict(exits="2", batch="8", classes="10,1000", dtypes="fp32", extra="")
# The targets, checked from the measured rows only: (E, B, C, dtype, mode) -> minimum speed-ups.
TARGET_SHAPE = (4, 256, 1000, "bf16", "fwd+bwd")
TARGET_SPEEDUPS = {"eager": 10.0, "compile": 3.0, "liger": 2.0}
TARGET_COPY_FRACTION = 0.8  # for E*B = 16384 rows at C = 32000


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

    def useful_bytes(self, mode: str) -> int:
        return self.io_bytes() * (2 if mode == "fwd+bwd" else 1)

    def kernel_bytes(self, mode: str) -> int:
        """Compulsory traffic of the fused kernels: fwd reads the logits and features once (the per-row statistics
        it keeps are E * 5 fp32 values per row, negligible); bwd reads them again and writes their gradients. The
        deepest exit is the teacher, so its rows are read once and shared by every exit."""
        s = DTYPES[self.dtype].itemsize
        io = self.E * self.B * (self.C + self.D) * s
        return {"fwd": io, "bwd": 2 * io, "fwd+bwd": 3 * io}[mode]


# --------------------------------------------------------------------------------------------- the loss


def byot_options(num_exits: int, feature_dim: int):
    """The fused loss options of the BYOT objective's defaults, built as training builds them."""
    from engine.config import load_config
    from engine.objectives.fused import loss_options

    cfg = load_config(None, [] if feature_dim else ["objective.byot.hint=none"])
    return loss_options(cfg, num_exits)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[list, list, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    logits = [(torch.randn(case.B, case.C, generator=g, device=device) * 3).to(dt) for _ in range(case.E)]
    feats = [torch.randn(case.B, case.D, generator=g, device=device).relu().to(dt) for _ in range(case.E)]
    y = torch.randint(0, case.C, (case.B,), generator=g, device=device)
    y[::16] = -100
    return logits, feats, y


def leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def liger_loss_fn(opts) -> Callable | str:
    """Liger's CE and KL-div kernels composed per exit, or why not."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return "not installed"
    from engine.objectives.functional import hint_loss

    ce, kl = LigerCrossEntropyLoss(ignore_index=-100), LigerKLDIVLoss(reduction="batchmean")
    T = opts.temperature
    scale = T * T if opts.t_squared else 1.0

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


def loss_fns(providers: list[str], fused_ok: str, device: torch.device, compile_backend: str = "inductor"
             ) -> dict[str, Callable[[dict], Callable] | str]:
    """provider -> factory(opts) -> loss(logits, feats, y) -> scalar, or a status string."""
    from kernels.reference import multi_exit_loss_reference

    def eager(opts):
        return lambda z, f, y: multi_exit_loss_reference(z, y, features=f or None, dtype=torch.float32,
                                                         **opts.as_kwargs()).sum()

    compiled: dict[tuple, Callable] = {}

    def compile_(mode: Optional[str]):
        def factory(opts):
            # the bwd mode replays one graph's backward (retain_graph), which donated backward buffers forbid
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
            key = (mode, opts)
            if key not in compiled:
                compiled[key] = torch.compile(eager(opts), dynamic=False, mode=mode, backend=compile_backend)
            fn = compiled[key]
            if mode != "reduce-overhead":
                return fn
            # one training step per call: the outputs of the previous replay may be overwritten
            return lambda z, f, y: (torch.compiler.cudagraph_mark_step_begin(), fn(z, f, y))[1]

        return factory

    def fused(opts):
        from kernels.multi_exit_loss import fused_loss

        return lambda z, f, y: fused_loss(z, y, opts, features=f or None)[0]

    liger = liger_loss_fn if device.type == "cuda" else "n/a: Liger's kernels run on CUDA only"
    table = {"eager": eager, "compile": compile_(None), "compile-ro": compile_("reduce-overhead"), "liger": liger,
             "fused": fused if fused_ok == "ok" else fused_ok}
    return {p: table[p] for p in providers}


# --------------------------------------------------------------------------------------------- timing


def cpu_bench(fn: Callable[[], Any], reps: int, grad_to_none: list[torch.Tensor]) -> list[float]:
    fn()  # warm-up (and the interpreter's first-call setup)
    times = []
    for _ in range(reps):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return times * 3
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7]]


def bench(fn: Callable[[], Any], device: torch.device, args, grad_to_none: list[torch.Tensor]) -> list[float]:
    """[median, p20, p80] in ms."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grad_to_none,
                                            quantiles=QUANTILES))
    return cpu_bench(fn, args.cpu_reps, grad_to_none)


def copy_bandwidth(device: torch.device, args) -> float:
    """GB/s of a plain device tensor copy, counting the read and the write (--copy-gbps: given, not measured)."""
    if getattr(args, "copy_gbps", None):
        return args.copy_gbps
    n = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, args, [])[0]
    return 2 * n / (ms * 1e-3) / 1e9


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


def _error(e: Exception) -> str:
    return f"error: {type(e).__name__}: {str(e)[:300]}"


def measure_case(case: Case, device: torch.device, args, fns: dict, copy_gbps: float,
                 flush: Callable[[list], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Every provider x mode on one shape; `flush(rows so far)` after each provider."""
    opts = byot_options(case.E, case.D)
    logits, feats, y = make_inputs(case, device)
    rows, ref_loss = [], None
    for provider, factory in fns.items():
        flush(rows)
        base = dict(asdict(case), provider=provider)
        loss = factory(opts) if callable(factory) else factory
        if isinstance(loss, str):
            rows += [dict(base, mode=m, status=loss) for m in args.modes]
            continue
        # every provider gets its own copies: Liger's CE overwrites its input logits with their gradient
        z, f = leaves(logits), leaves(feats) if case.D else []
        try:
            value = loss(z, f, y).detach().double()
            ref_loss = value if provider == "eager" else ref_loss
            mem = peak_memory(loss, z, f, y, device)
        except Exception as e:  # noqa: BLE001 - one failing provider must not lose the others' numbers
            rows += [dict(base, mode=m, status=_error(e)) for m in args.modes]
            continue
        err = None if ref_loss is None else abs(value - ref_loss).item()
        for mode in args.modes:
            try:
                med, p20, p80 = bench(mode_fn(mode, loss, z, f, y), device, args, z + f)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(base, mode=mode, status=_error(e)))
                continue
            gbps = case.useful_bytes(mode) / (med * 1e-3) / 1e9
            row = dict(base, mode=mode, status="ok", ms_p50=med, ms_p20=p20, ms_p80=p80, gbps=gbps,
                       copy_fraction=gbps / copy_gbps, peak_mem_gib=None if mem is None else mem / 2**30,
                       peak_mem_over_grads=None if mem is None else mem / case.io_bytes(), loss=value.item(),
                       abs_diff_vs_eager=err)
            if provider == "fused":
                kgbps = case.kernel_bytes(mode) / (med * 1e-3) / 1e9
                row.update(kernel_gbps=kgbps, kernel_copy_fraction=kgbps / copy_gbps)
            if args.graphs:
                row.update(graph_fields(provider, mode, mode_fn(mode, loss, z, f, y), device, args, z + f, med))
            rows.append(row)
        del z, f
    flush(rows)
    return rows


def graph_fields(provider: str, mode: str, fn: Callable[[], Any], device: torch.device, args,
                 grads: list[torch.Tensor], ms: float) -> dict[str, Any]:
    """`fn` captured in a CUDA graph: graph_status, the replays' median/p20/p80 ms (device time alone) and host_ms
    (do_bench's median minus the replay's). A call that syncs with the host cannot be captured: one call under the
    sync debug mode finds that first."""
    if device.type != "cuda" or mode == "bwd" or provider == "compile-ro":
        return {"graph_status": "n/a: " + ("CUDA graphs need a GPU" if device.type != "cuda" else
                                           "a retained backward is not replayed" if mode == "bwd" else
                                           "reduce-overhead replays its own CUDA graphs")}
    from bench.common import cuda_graph_fn

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


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """other time / fused time, per (shape, mode), on each fused row."""
    ok = {(r["E"], r["B"], r["C"], r["dtype"], r["mode"], r["provider"]): r for r in rows if r["status"] == "ok"}
    for key, r in ok.items():
        if not key[-1].startswith("fused"):
            continue
        for other in BASELINES:
            o = ok.get(key[:-1] + (other,))
            r[f"speedup_vs_{other}"] = o["ms_p50"] / r["ms_p50"] if o else None


# --------------------------------------------------------------------------------------------- reports


def targets(rows: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The issue's targets from measured fused rows only (n/a when not measured, and never judged off a GPU)."""
    fused = {(r["E"], r["B"], r["C"], r["dtype"], r["mode"], r["provider"]): r for r in rows
             if r["provider"].startswith("fused") and r["status"] == "ok"}
    judge = (lambda v, need: None if v is None or device.type != "cuda" else v >= need)  # noqa: E731
    out = []
    for variant in ("fused",):
        r = fused.get(TARGET_SHAPE + (variant,))
        for other, need in TARGET_SPEEDUPS.items():
            got = r.get(f"speedup_vs_{other}") if r else None
            out.append(dict(target=f"{variant}, E=4 B=256 C=1000 bf16 fwd+bwd: >= {need:g}x faster than {other}",
                            value=got, met=judge(got, need)))
        big = [v for k, v in fused.items() if k[0] * k[1] >= 16384 and k[2] >= 32000 and k[4] == "fwd+bwd"
               and k[5] == variant]
        for metric, key in (("kernel traffic", "kernel_copy_fraction"), ("useful bytes", "copy_fraction")):
            frac = max((v[key] for v in big), default=None)
            out.append(dict(target=f"{variant}, E*B >= 16384 C >= 32000 fwd+bwd, {metric}: >= "
                                   f"{TARGET_COPY_FRACTION:.0%} of copy bandwidth", value=frac,
                            met=judge(frac, TARGET_COPY_FRACTION)))
    return out


def _ms(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    return f"{r['ms_p50']:.4g}" if r["status"] == "ok" else r["status"]


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0%}"


def _num(v: Optional[float], fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(payload: dict[str, Any], device: torch.device) -> str:
    rows, prov = payload["rows"], payload["provenance"]
    lines = ["# Fused multi-exit loss: microbenchmark", "", provenance_md(prov), cpu_note(device)]
    if device.type != "cuda":
        lines.append("> The fused kernel ran in the Triton interpreter here: its times are not a measurement.\n")
    lines += [f"Copy bandwidth (device tensor copy, read + write): **{payload['copy_gbps']:.1f} GB/s**. "
              f"Loss: BYOT defaults, {payload['loss']}. Times: median ms (p20/p80 in report.json). "
              f"Bandwidth: {payload['gbps_definition']}.", "",
              "## Targets (from the rows below; n/a = not measured here)", ""]
    lines.append(md_table(["target", "measured", "met"],
                          [[t["target"], "-" if t["value"] is None else f"{t['value']:.2f}",
                            {True: "yes", False: "**no**", None: "n/a"}[t["met"]]] for t in payload["targets"]]))
    by = {(r["E"], r["B"], r["C"], r["dtype"], r["mode"], r["provider"]): r for r in rows}
    shapes = sorted({(r["E"], r["B"], r["C"], r["dtype"]) for r in rows}, key=lambda s: (s[3], s[0], s[1], s[2]))
    variants = [p for p in payload["providers"] if p.startswith("fused")]
    baselines = [p for p in payload["providers"] if p in BASELINES]
    for mode in payload["modes"]:
        lines += ["", f"## {mode}: median ms", ""]
        lines.append(md_table(["E", "B", "C", "dtype", *payload["providers"]],
                              [[*s, *[_ms(by.get(s + (mode, p))) for p in payload["providers"]]] for s in shapes]))
        graphed = [by[s + (mode, p)] for s in shapes for p in payload["providers"]
                   if "graph_status" in by.get(s + (mode, p), {})]
        if graphed:
            lines += ["", f"## {mode}: do_bench against CUDA-graph replay (median ms; host = the difference)", ""]
            lines.append(md_table(["E", "B", "C", "dtype", "provider", "do_bench", "graph replay", "host"], [
                [r["E"], r["B"], r["C"], r["dtype"], r["provider"], _ms(r),
                 _num(r.get("graph_ms_p50"), ".4g") if r["graph_status"] == "ok" else r["graph_status"],
                 _num(r.get("host_ms"), ".4g")] for r in graphed]))
        fused_rows = [(s, v, by.get(s + (mode, v))) for s in shapes for v in variants]
        fused_rows = [(s, v, r) for s, v, r in fused_rows if r is not None and r["status"] == "ok"]
        if not fused_rows:
            continue
        lines += ["", f"## {mode}: fused kernels", ""]
        lines.append(md_table(
            ["E", "B", "C", "dtype", "variant", *[f"vs {b}" for b in baselines], "useful GB/s", "% copy",
             "kernel GB/s", "% copy (kernel)", "peak mem GiB", "peak mem / grads", "|Δloss| vs eager"],
            [[*s, v, *[_x(r.get(f"speedup_vs_{b}")) for b in baselines], _num(r["gbps"]), _pct(r["copy_fraction"]),
              _num(r["kernel_gbps"]), _pct(r["kernel_copy_fraction"]), _num(r["peak_mem_gib"], ".3g"),
              _num(r["peak_mem_over_grads"], ".2f"),
              _num(r["abs_diff_vs_eager"], ".1e")] for s, v, r in fused_rows]))
    return "\n".join(lines) + "\n"


def plot_times(payload: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig):
        rows = [r for r in payload["rows"] if r["status"] == "ok" and r["mode"] == "fwd+bwd"]
        dtypes = sorted({r["dtype"] for r in rows})
        e_max, b_mid = max(r["E"] for r in rows), sorted({r["B"] for r in rows})[len({r["B"] for r in rows}) // 2]
        for i, dt in enumerate(dtypes):
            ax = fig.add_subplot(1, len(dtypes), i + 1)
            for p in payload["providers"]:
                pts = sorted((r["C"], r["ms_p50"]) for r in rows
                             if r["provider"] == p and r["dtype"] == dt and r["E"] == e_max and r["B"] == b_mid)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p)
            ax.set(xscale="log", yscale="log", xlabel="classes C", ylabel="ms (median)",
                   title=f"fwd+bwd, E={e_max}, B={b_mid}, {dt}")
            ax.legend()

    return draw


def plot_bandwidth(payload: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        rows = [r for r in payload["rows"] if r["status"] == "ok" and r["provider"] == "fused"
                and r["mode"] == "fwd+bwd"]
        for key in sorted({(r["E"], r["B"], r["dtype"]) for r in rows}):
            pts = sorted((r["C"], r["kernel_copy_fraction"] * 100) for r in rows
                         if (r["E"], r["B"], r["dtype"]) == key)
            ax.plot(*zip(*pts), marker="o", label=f"E={key[0]} B={key[1]} {key[2]}")
        ax.axhline(TARGET_COPY_FRACTION * 100, ls="--", color="grey")
        ax.set(xscale="log", xlabel="classes C", ylabel="% of copy bandwidth (kernel traffic)",
               title="fused fwd+bwd bandwidth")
        ax.legend(fontsize=7, ncol=2)

    return draw


# --------------------------------------------------------------------------------------------- entry points


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="selfdistill bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--exits", help="exit counts E (default GPU 2,4; CPU 2)")
    p.add_argument("--batch", help="rows B (default GPU 64,256,1024; CPU 8)")
    p.add_argument("--classes", help="classes C (default GPU 10,100,1000,32000; CPU 10,1000)")
    p.add_argument("--dtypes", help="fp32,bf16,fp16 (default GPU fp32,bf16; CPU fp32)")
    p.add_argument("--extra", help="extra ExBxC shapes (default GPU 4x4096x32000, the bandwidth target; CPU none)")
    p.add_argument("--quick", action="store_true", help="GPU: E=4, B=256,1024, C=1000,32000, bf16 + the target "
                   "shape (both targets covered, a few minutes)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--feature-dim", type=int, default=512, help="pooled feature width D for the hints; 0 = none")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time (GPU)")
    p.add_argument("--cpu-reps", type=int, default=5, help="timed calls per figure on CPU")
    p.add_argument("--graphs", action="store_true", help="also time fwd and fwd+bwd as CUDA-graph replays (GPU)")
    p.add_argument("--copy-gbps", type=float, help="copy bandwidth measured earlier (default: measure it here)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile providers")
    p.add_argument("--host-overhead", action="store_true", help="only the host time and device-op count of the BYOT "
                   "objective's fused forward + backward, launches stubbed (bench/host_overhead.py)")
    p.add_argument("--host-reps", type=int, default=500, help="timed calls of --host-overhead")
    p.add_argument("--out", help="report folder (default bench/results/kernels-<date>-<device>/)")
    a = p.parse_args(argv)
    a.modes, a.providers = csv_list(a.modes), csv_list(a.providers)
    check_choices("--modes", a.modes, MODES)
    check_choices("--providers", a.providers, PROVIDERS)
    return a


def cases(args, device: torch.device) -> list[Case]:
    sweep = CPU_SWEEP if device.type != "cuda" else QUICK_GPU_SWEEP if args.quick else GPU_SWEEP
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sweep.items()}
    dtypes = csv_list(pick["dtypes"])
    check_choices("--dtypes", dtypes, list(DTYPES))
    grid = [Case(e, b, c, args.feature_dim, dt) for dt in dtypes for e in int_list(pick["exits"])
            for b in int_list(pick["batch"]) for c in int_list(pick["classes"])]
    for shape in csv_list(pick["extra"]):
        e, b, c = (int(v) for v in shape.lower().split("x"))
        grid += [Case(e, b, c, args.feature_dim, dt) for dt in dtypes]
    return grid


def fused_status(device: torch.device) -> str:
    """Select the interpreter on CPU before the kernels are first imported; say why the kernel cannot run."""
    if device.type == "cpu" and "kernels.multi_exit_tiles" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "unavailable: CPU needs TRITON_INTERPRET=1"
    return "ok"


def run(argv: list[str]) -> dict[str, Any]:
    """Measure and write the report (after every provider too); returns the payload plus the written paths under
    'written'."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.host_overhead:
        return host_overhead_report(args, device)
    fns = loss_fns(args.providers, fused_status(device), device, args.compile_backend)
    copy_gbps = copy_bandwidth(device, args)
    log(f"bench kernels on {device}: copy bandwidth {copy_gbps:.1f} GB/s")
    out_dir = default_out_dir("kernels", device) if args.out is None else Path(args.out)
    rows: list[dict[str, Any]] = []
    for case in cases(args, device):
        t0, done = time.perf_counter(), list(rows)
        rows += measure_case(case, device, args, fns, copy_gbps,
                             flush=lambda part: write_report(done + part, args, device, copy_gbps, out_dir, False))
        log(f"  {case.label()}: {time.perf_counter() - t0:.1f} s")
    payload = write_report(rows, args, device, copy_gbps, out_dir, True)
    log(f"report: {payload['written']['markdown']}")
    return payload


def host_overhead_report(args, device: torch.device) -> dict[str, Any]:
    status = fused_status(device)
    if status != "ok":
        raise SystemExit(f"bench kernels --host-overhead: the fused kernel is {status}")
    from bench.host_overhead import report

    fig = report(device, args.host_reps)
    host = fig["host_us"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload = dict(provenance=provenance(device), rows=[], load_average_1min=load, **fig)
    md = "\n".join([
        "# Fused multi-exit loss: host overhead", "", provenance_md(payload["provenance"]),
        f"BYOT objective, {fig['shape']}, one forward + backward (`total.backward()`), the two Triton launches "
        f"stubbed; {host['reps']} calls, 1-minute load average {load}.", "",
        md_table(["path", "host us (median)", "p20 / p80", "device ops that touch memory", "target"],
                 [["fused", f"{host['median']:.1f}", f"{host['p20']:.1f} / {host['p80']:.1f}",
                   f"{fig['launches']} ({fig['triton_launches']} Triton + {', '.join(fig['other_ops']) or 'none'})",
                   "<= 60 us, <= 3"],
                  ["eager PyTorch objective", "-", "-", str(fig["eager_launches"]), "-"]]), ""])
    out_dir = default_out_dir("kernels-host", device) if args.out is None else Path(args.out)
    payload["written"] = Report("kernels-host", payload, md).write(out_dir)
    log(f"host overhead: {host['median']:.1f} us per fwd+bwd, {fig['launches']} device ops; "
        f"report: {payload['written']['markdown']}")
    return payload


def write_report(rows: list[dict[str, Any]], args, device: torch.device, copy_gbps: float, out_dir: Path,
                 plots: bool) -> dict[str, Any]:
    add_speedups(rows)
    liger = next((r["status"] for r in rows if r["provider"] == "liger"), "not requested")
    payload = dict(provenance=provenance(device, {"liger_kernel": liger if liger != "ok" else "installed"}),
                   copy_gbps=copy_gbps, modes=args.modes, providers=args.providers, feature_dim=args.feature_dim,
                   loss=("teacher = deepest exit, KL at T=3 with T^2, CE weight 0.9, KD weight 0.1, "
                         + (f"sse hints on D={args.feature_dim} features (weight 1e-6)" if args.feature_dim
                            else "no hints")),
                   timing=("triton.testing.do_bench quantiles [0.5, 0.2, 0.8]" if device.type == "cuda" else
                           f"time.perf_counter, {args.cpu_reps} calls"),
                   gbps_definition=("useful = logits+features read once (fwd), their gradients written once (bwd), "
                                    "both (fwd+bwd); kernel = every buffer the fused kernels read or write, once"),
                   complete=plots, rows=rows)
    payload["targets"] = targets(rows, device)
    figures = {"time_vs_classes.png": plot_times(payload), "fused_bandwidth.png": plot_bandwidth(payload)}
    payload["written"] = Report("kernels", payload, markdown(payload, device), figures if plots else {}
                                ).write(out_dir)
    return payload


def main(argv: Optional[list[str]] = None) -> int:
    payload = run(sys.argv[1:] if argv is None else argv)
    failed = [r for r in payload["rows"] if r["status"].startswith("error")]
    for r in failed:
        log(f"FAILED {r['provider']} {Case(r['E'], r['B'], r['C'], r['D'], r['dtype']).label()} {r['mode']}: "
            f"{r['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
