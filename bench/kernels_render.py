"""The report half of `selfdistill bench kernels`: speed-ups between providers, the targets' verdicts, report.md
and its plots, from the measured rows alone."""
from __future__ import annotations

from typing import Any, Callable

import torch

from bench.kernels_measure import PROVIDERS, Row
from bench.report import fmt, lines, md_table, provenance_md
from bench.targets import target

# The targets, judged from measured rows only: (E, B, C, dtype, mode) -> minimum speed-ups over each baseline.
TARGET_SHAPE = (4, 256, 1000, "bf16", "fwd+bwd")
TARGET_SPEEDUPS = {"eager": 10.0, "compile": 3.0, "liger": 2.0}
TARGET_COPY_FRACTION = 0.8  # for E*B >= 16384 rows at C >= 32000


def add_speedups(rows: list[Row]) -> None:
    """On each fused row: every other provider's time / the fused time, same shape and mode."""
    ok = {r.key(): r for r in rows if r.ok}
    for k, r in ok.items():
        if k[-1] == "fused":
            for other in PROVIDERS[:-1]:
                o = ok.get(k[:-1] + (other,))
                r.speedups[other] = o.ms_p50 / r.ms_p50 if o else None


def targets(rows: list[Row], device: torch.device) -> list[dict[str, Any]]:
    fused = {r.key(): r for r in rows if r.provider == "fused" and r.ok}
    head = fused.get(TARGET_SHAPE + ("fused",))
    out = [target(f"fused, E=4 B=256 C=1000 bf16 fwd+bwd: >= {need:g}x faster than {other}",
                  speed := head and head.speedups.get(other), (speed or 0) >= need, device)
           for other, need in TARGET_SPEEDUPS.items()]
    big = [r for k, r in fused.items() if k[0] * k[1] >= 16384 and k[2] >= 32000 and k[4] == "fwd+bwd"]
    for metric, field in (("kernel traffic", "kernel_copy_fraction"), ("useful bytes", "copy_fraction")):
        frac = max((getattr(r, field) for r in big), default=None)
        out.append(target(f"fused, E*B >= 16384 C >= 32000 fwd+bwd, {metric}: >= {TARGET_COPY_FRACTION:.0%} of copy "
                          "bandwidth", frac, (frac or 0) >= TARGET_COPY_FRACTION, device))
    return out


def markdown(payload: dict[str, Any], rows: list[Row], device: torch.device) -> str:
    providers = payload["providers"]
    by = {r.key(): r for r in rows}
    ms = lambda r: "-" if r is None else fmt(r.ms_p50) if r.ok else r.status  # noqa: E731
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
        graphed = [r for s in shapes for p in providers if (r := by.get(s + (mode, p))) and r.graph]
        if graphed:
            lines += [f"## {mode}: do_bench against CUDA-graph replay (median ms; host = the difference)", "",
                      md_table(["E", "B", "C", "dtype", "provider", "do_bench", "graph replay", "host"],
                               [[*r.key()[:4], r.provider, ms(r), fmt(r.graph.get("graph_ms_p50"))
                                 if r.graph["graph_status"] == "ok" else r.graph["graph_status"],
                                 fmt(r.graph.get("host_ms"))] for r in graphed])]
        fused = [r for s in shapes if (r := by.get(s + (mode, "fused"))) and r.ok]
        if fused:
            others = [p for p in providers if p != "fused"]
            lines += [f"## {mode}: fused kernels", "", md_table(
                ["E", "B", "C", "dtype", *[f"vs {b}" for b in others], "useful GB/s", "% copy", "kernel GB/s",
                 "% copy (kernel)", "peak mem GiB", "peak mem / grads", "|Δloss| vs eager"],
                [[*r.key()[:4], *[fmt(r.speedups.get(b)) for b in others], fmt(r.gbps), fmt(r.copy_fraction),
                  fmt(r.kernel_gbps), fmt(r.kernel_copy_fraction), fmt(r.peak_mem_gib), fmt(r.peak_mem_over_grads),
                  fmt(r.abs_diff_vs_eager)] for r in fused])]
    return "\n".join(lines)


def figures(rows: list[Row], providers: list[str], dtypes: list[str]) -> dict[str, Callable]:
    rows = [r for r in rows if r.ok and r.mode == "fwd+bwd"]
    if not rows:
        return {}
    e, bs = max(r.case.E for r in rows), sorted({r.case.B for r in rows})
    b_mid = bs[len(bs) // 2]

    def pts(y: Callable[[Row], float], provider: str, E: int, B: int, dtype: str) -> list[tuple[int, float]]:
        return [(r.case.C, y(r)) for r in rows
                if (r.provider, r.case.E, r.case.B, r.case.dtype) == (provider, E, B, dtype)]

    return {"time_vs_classes.png": lines(
                {f"{p} {dt}": pts(lambda r: r.ms_p50, p, e, b_mid, dt) for p in providers for dt in dtypes},
                "classes C", "ms (median)", f"fwd+bwd, E={e}, B={b_mid}", "xy"),
            "fused_bandwidth.png": lines(
                {f"E={e_} B={b} {dt}": pts(lambda r: 100 * r.kernel_copy_fraction, "fused", e_, b, dt)
                 for e_, b, dt in sorted({(r.case.E, r.case.B, r.case.dtype) for r in rows})},
                "classes C", "% of copy bandwidth (kernel traffic)", "fused fwd+bwd bandwidth", "x",
                100 * TARGET_COPY_FRACTION)}
