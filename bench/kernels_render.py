"""The report half of `selfdistill bench kernels`: speed-ups between providers, the targets' verdicts, report.md
and its plots, from the measured rows alone."""
from __future__ import annotations

from typing import Any, Callable

import torch

from bench.kernels_measure import PROVIDERS
from bench.report import fmt, lines, md_table, provenance_md
from bench.targets import target

# The targets, judged from measured rows only: (E, B, C, dtype, mode) -> minimum speed-ups over each baseline.
TARGET_SHAPE = (4, 256, 1000, "bf16", "fwd+bwd")
TARGET_SPEEDUPS = {"eager": 10.0, "compile": 3.0, "liger": 2.0}
TARGET_COPY_FRACTION = 0.8  # for E*B >= 16384 rows at C >= 32000


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


