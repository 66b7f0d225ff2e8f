"""`selfdistill bench kernels`: the fused multi-exit loss against eager PyTorch, torch.compile and Liger-Kernel.

BYOT's loss with the engine's defaults on E exits of [B, C] logits and [B, D] features; providers eager
(kernels.multi_exit.reference in fp32), compile and compile-ro (torch.compile of it, the second with
reduce-overhead), liger (CUDA only) and fused; modes fwd, bwd and fwd+bwd. On CPU the fused kernel runs in the
Triton interpreter: a smoke test, not a measurement. `selfdistill bench host-overhead` reports the host side.
bench/README.md: what is measured.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

from bench.measure import cuda_graph_fn, median_p20_p80
from bench.report import (
    base_parser,
    csv_list,
    fmt,
    lines,
    log,
    md_table,
    provenance,
    provenance_md,
    start,
    write_report,
)
from bench.targets import target
from engine.config import ByotConfig
from engine.objectives.byot import ByotWeights, byot_options
from engine.objectives.functional import hint_loss
from kernels import choose_interpreter
from kernels.multi_exit.options import LossOptions
from kernels.multi_exit.reference import multi_exit_loss_reference

PROVIDERS = ("eager", "compile", "compile-ro", "liger", "fused")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SWEEPS = {"cuda": dict(exits="2,4", batch="64,256,1024", classes="10,100,1000,32000", dtypes="fp32,bf16",
                       extra="4x4096x32000"),
          "cpu": dict(exits="2", batch="8", classes="10,1000", dtypes="fp32", extra="")}
# The targets, judged from measured rows only: (E, B, C, dtype, mode) -> minimum speed-ups over each baseline.
TARGET_SHAPE = (4, 256, 1000, "bf16", "fwd+bwd")
TARGET_SPEEDUPS = {"eager": 10.0, "compile": 3.0, "liger": 2.0}
TARGET_COPY_FRACTION = 0.8  # for E*B >= 16384 rows at C >= 32000


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
        from kernels.multi_exit.op import fused_loss  # loads triton: after fused_status chose the interpreter

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
        import triton.testing  # loads triton: after fused_status chose the interpreter

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
                 flush: Callable[[list], None]) -> list[dict[str, Any]]:
    """Every provider x mode on one shape; `flush(rows so far)` after each provider."""
    opts = byot_defaults(case.E, hint=bool(case.D))
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
        z = [t.detach().clone().requires_grad_(True) for t in logits]
        f = [t.detach().clone().requires_grad_(True) for t in feats] if case.D else []
        try:
            value = loss(z, f, y).detach().double()
            ref_loss = value if provider == "eager" else ref_loss
            mem = peak_memory(loss, z, f, y, device)
        except Exception as e:  # noqa: BLE001 - one failing provider must not lose the others' numbers
            rows += [dict(base, mode=m, status=_error(e)) for m in args.modes]
            continue
        for mode in args.modes:
            try:
                med, p20, p80 = bench(mode_fn(mode, loss, z, f, y), device, args, z + f)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(base, mode=mode, status=_error(e)))
                continue
            gbps = case.io_bytes() * TRAFFIC["useful"][mode] / (med * 1e-3) / 1e9
            row = dict(base, mode=mode, status="ok", ms_p50=med, ms_p20=p20, ms_p80=p80, gbps=gbps,
                       copy_fraction=gbps / copy_gbps, peak_mem_gib=None if mem is None else mem / 2**30,
                       peak_mem_over_grads=None if mem is None else mem / case.io_bytes(), loss=value.item(),
                       abs_diff_vs_eager=None if ref_loss is None else abs(value - ref_loss).item())
            if provider == "fused":
                kgbps = case.io_bytes() * TRAFFIC["kernel"][mode] / (med * 1e-3) / 1e9
                row.update(kernel_gbps=kgbps, kernel_copy_fraction=kgbps / copy_gbps)
            if args.graphs:
                row.update(graph_fields(provider, mode, mode_fn(mode, loss, z, f, y), device, args, z + f, med))
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


def key(r: dict) -> tuple:
    return r["E"], r["B"], r["C"], r["dtype"], r["mode"], r["provider"]


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """On each fused row: other provider's time / fused time, same shape and mode."""
    ok = {key(r): r for r in rows if r["status"] == "ok"}
    for k, r in ok.items():
        if k[-1] == "fused":
            for other in PROVIDERS[:-1]:
                o = ok.get(k[:-1] + (other,))
                r[f"speedup_vs_{other}"] = o["ms_p50"] / r["ms_p50"] if o else None


def targets(rows: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    fused = {key(r): r for r in rows if r["provider"] == "fused" and r["status"] == "ok"}
    head = fused.get(TARGET_SHAPE + ("fused",), {})
    out = [target(f"fused, E=4 B=256 C=1000 bf16 fwd+bwd: >= {need:g}x faster than {other}",
                  head.get(f"speedup_vs_{other}"), (head.get(f"speedup_vs_{other}") or 0) >= need, device)
           for other, need in TARGET_SPEEDUPS.items()]
    big = [r for k, r in fused.items() if k[0] * k[1] >= 16384 and k[2] >= 32000 and k[4] == "fwd+bwd"]
    for metric, field in (("kernel traffic", "kernel_copy_fraction"), ("useful bytes", "copy_fraction")):
        frac = max((r[field] for r in big), default=None)
        out.append(target(f"fused, E*B >= 16384 C >= 32000 fwd+bwd, {metric}: >= {TARGET_COPY_FRACTION:.0%} of copy "
                          "bandwidth", frac, (frac or 0) >= TARGET_COPY_FRACTION, device))
    return out


def markdown(payload: dict[str, Any], device: torch.device) -> str:
    rows, providers = payload["rows"], payload["providers"]
    by = {key(r): r for r in rows}
    ms = lambda r: "-" if r is None else fmt(r["ms_p50"]) if r["status"] == "ok" else r["status"]  # noqa: E731
    shapes = sorted({k[:4] for k in by}, key=lambda s: (s[3], s[0], s[1], s[2]))
    lines = ["# Fused multi-exit loss: microbenchmark", "", provenance_md(payload["provenance"])]
    if device.type != "cuda":
        lines.append("> The fused kernel ran in the Triton interpreter here: its times are not a measurement.\n")
    lines += [f"Copy bandwidth (device tensor copy, read + write): **{payload['copy_gbps']:.1f} GB/s**. Loss: BYOT "
              f"defaults, {payload['loss']}. Times: median ms (p20/p80 in report.json).", "", "## Targets", "",
              md_table(["target", "measured", "status"], [[t["target"], fmt(t["value"]), t["status"]]
                                                          for t in payload["targets"]])]
    for mode in payload["modes"]:
        lines += [f"## {mode}: median ms", "", md_table(["E", "B", "C", "dtype", *providers],
                                                        [[*s, *[ms(by.get(s + (mode, p))) for p in providers]]
                                                         for s in shapes])]
        graphed = [r for s in shapes for p in providers if "graph_status" in (r := by.get(s + (mode, p), {}))]
        if graphed:
            lines += [f"## {mode}: do_bench against CUDA-graph replay (median ms; host = the difference)", "",
                      md_table(["E", "B", "C", "dtype", "provider", "do_bench", "graph replay", "host"],
                               [[*key(r)[:4], r["provider"], ms(r), fmt(r.get("graph_ms_p50")) if r["graph_status"] ==
                                 "ok" else r["graph_status"], fmt(r.get("host_ms"))] for r in graphed])]
        fused = [r for s in shapes if (r := by.get(s + (mode, "fused"), {})).get("status") == "ok"]
        if fused:
            others = [p for p in providers if p != "fused"]
            lines += [f"## {mode}: fused kernels", "", md_table(
                ["E", "B", "C", "dtype", *[f"vs {b}" for b in others], "useful GB/s", "% copy", "kernel GB/s",
                 "% copy (kernel)", "peak mem GiB", "peak mem / grads", "|Δloss| vs eager"],
                [[*key(r)[:4], *[fmt(r.get(f"speedup_vs_{b}")) for b in others], fmt(r["gbps"]),
                  fmt(r["copy_fraction"]), fmt(r["kernel_gbps"]), fmt(r["kernel_copy_fraction"]),
                  fmt(r["peak_mem_gib"]), fmt(r["peak_mem_over_grads"]), fmt(r["abs_diff_vs_eager"])]
                 for r in fused])]
    return "\n".join(lines)


def figures(payload: dict[str, Any]) -> dict[str, Callable]:
    rows = [r for r in payload["rows"] if r["status"] == "ok" and r["mode"] == "fwd+bwd"]
    if not rows:
        return {}
    e, bs = max(r["E"] for r in rows), sorted({r["B"] for r in rows})
    pts = lambda want, y: [(r["C"], y(r)) for r in rows if all(r[k] == v for k, v in want.items())]  # noqa: E731
    return {"time_vs_classes.png": lines(
                {f"{p} {dt}": pts(dict(provider=p, dtype=dt, E=e, B=bs[len(bs) // 2]), lambda r: r["ms_p50"])
                 for p in payload["providers"] for dt in payload["dtypes"]}, "classes C", "ms (median)",
                f"fwd+bwd, E={e}, B={bs[len(bs) // 2]}", "xy"),
            "fused_bandwidth.png": lines(
                {f"E={e_} B={b} {dt}": pts(dict(provider="fused", E=e_, B=b, dtype=dt),
                                           lambda r: 100 * r["kernel_copy_fraction"])
                 for e_, b, dt in sorted({(r["E"], r["B"], r["dtype"]) for r in rows})},
                "classes C", "% of copy bandwidth (kernel traffic)", "fused fwd+bwd bandwidth", "x",
                100 * TARGET_COPY_FRACTION)}


def parse_args(argv: list[str]):
    p = base_parser("selfdistill bench kernels", __doc__, repeats=5)
    p.add_argument("--exits", help="exit counts E (default GPU 2,4; CPU 2)")
    p.add_argument("--batch", help="rows B (default GPU 64,256,1024; CPU 8)")
    p.add_argument("--classes", help="classes C (default GPU 10,100,1000,32000; CPU 10,1000)")
    p.add_argument("--dtypes", help="fp32,bf16,fp16 (default GPU fp32,bf16; CPU fp32)")
    p.add_argument("--extra", help="extra ExBxC shapes (default GPU 4x4096x32000, the bandwidth target; CPU none)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--feature-dim", type=int, default=512, help="pooled feature width D for the hints; 0 = none")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time (GPU)")
    p.add_argument("--graphs", action="store_true", help="also time fwd and fwd+bwd as CUDA-graph replays (GPU)")
    p.add_argument("--copy-gbps", type=float, help="copy bandwidth measured earlier (default: measure it here)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile providers")
    a = p.parse_args(argv)
    a.modes, a.providers = csv_list(a.modes, str, MODES, "--modes"), csv_list(a.providers, str, PROVIDERS,
                                                                               "--providers")
    return a


def cases(args, device: torch.device) -> list[Case]:
    pick = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in SWEEPS[device.type].items()}
    dtypes = csv_list(pick["dtypes"], str, tuple(DTYPES), "--dtypes")
    shapes = [(e, b, c) for e in csv_list(pick["exits"], int) for b in csv_list(pick["batch"], int)
              for c in csv_list(pick["classes"], int)]
    shapes += [tuple(int(v) for v in s.lower().split("x")) for s in csv_list(pick["extra"])]
    return [Case(e, b, c, args.feature_dim, dt) for dt in dtypes for e, b, c in shapes]


def run(argv: list[str]) -> dict[str, Any]:
    """Measure and write the report, rewritten after every provider; the payload, with the written paths."""
    args = parse_args(argv)
    device, out_dir = start(args, "kernels")
    fns, todo = loss_fns(args.providers, device, args.compile_backend), cases(args, device)
    copy_gbps = copy_bandwidth(device, args)
    log(f"bench kernels on {device}: copy bandwidth {copy_gbps:.1f} GB/s")
    payload = dict(provenance=provenance(device), copy_gbps=copy_gbps, modes=args.modes, providers=args.providers,
                   dtypes=sorted({c.dtype for c in todo}), feature_dim=args.feature_dim,
                   loss=("teacher = deepest exit, KL at T=3 with T^2, CE weight 0.9, KD weight 0.1, " +
                         (f"sse hints on D={args.feature_dim} features (weight 1e-6)" if args.feature_dim
                          else "no hints")),
                   timing=("triton.testing.do_bench quantiles [0.5, 0.2, 0.8]" if device.type == "cuda" else
                           f"time.perf_counter, {args.repeats} calls"),
                   gbps_definition=("useful = logits+features read once (fwd), their gradients written once (bwd), "
                                    "both (fwd+bwd); kernel = every buffer the fused kernels read or write, once"))

    def write(rows: list[dict], final: bool) -> dict[str, Any]:
        add_speedups(rows)
        liger = next((r["status"] for r in rows if r["provider"] == "liger"), "not requested")
        payload["provenance"]["liger_kernel"] = "installed" if liger == "ok" else liger
        payload.update(rows=rows, complete=final, targets=targets(rows, device))
        plots = figures(payload) if final and not args.no_plots else None
        return dict(payload, written=write_report(out_dir, payload, markdown(payload, device), plots))

    rows: list[dict[str, Any]] = []
    for case in todo:
        t0, done = time.perf_counter(), list(rows)
        rows += measure_case(case, device, args, fns, copy_gbps, lambda part: write(done + part, False))
        log(f"  {case.label()}: {time.perf_counter() - t0:.1f} s")
    result = write(rows, True)
    log(f"report: {result['written']['markdown']}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    payload = run(sys.argv[1:] if argv is None else argv)
    failed = [r for r in payload["rows"] if r["status"].startswith("error")]
    for r in failed:
        log(f"FAILED {r['provider']} {Case(*key(r)[:3], r['D'], r['dtype']).label()} {r['mode']}: {r['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
