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
from typing import Any, Optional

import torch

from bench.kernels_measure import DTYPES, MODES, PROVIDERS, Case, Row, copy_bandwidth, loss_fns, measure_case
from bench.kernels_render import add_speedups, figures, markdown, targets
from bench.report import base_parser, csv_list, log, provenance, start, write_report

SWEEPS = {"cuda": dict(exits="2,4", batch="64,256,1024", classes="10,100,1000,32000", dtypes="fp32,bf16",
                       extra="4x4096x32000"),
          "cpu": dict(exits="2", batch="8", classes="10,1000", dtypes="fp32", extra="")}

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
    if "--host-overhead" in argv:  # the flag that `bench host-overhead` replaced: scripts written for it still run
        from bench import host_overhead

        log("bench kernels --host-overhead is now `selfdistill bench host-overhead` (--host-reps is its --reps)")
        return host_overhead.run([a.replace("--host-reps", "--reps", 1) if a.split("=")[0] == "--host-reps" else a
                                  for a in argv if a != "--host-overhead"])
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

    def write(rows: list[Row], final: bool) -> dict[str, Any]:
        add_speedups(rows)
        liger = next((r.status for r in rows if r.provider == "liger"), "not requested")
        payload["provenance"]["liger_kernel"] = "installed" if liger == "ok" else liger
        payload.update(rows=[r.json() for r in rows], complete=final, targets=targets(rows, device))
        plots = figures(rows, args.providers, payload["dtypes"]) if final and not args.no_plots else None
        return dict(payload, written=write_report(out_dir, payload, markdown(payload, rows, device), plots))

    rows: list[Row] = []
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
        log(f"FAILED {r['provider']} {Case(r['E'], r['B'], r['C'], r['D'], r['dtype']).label()} {r['mode']}: "
            f"{r['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
