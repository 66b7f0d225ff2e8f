"""The tables of kernels/aot/check.py: the per-variant summary, the targets and the per-kernel detail, as text or
as the markdown committed under bench/results/kernels-sass-<date>.md.
"""
from __future__ import annotations

import datetime
import math
import os
import subprocess

from kernels.aot import sass as aot_sass

TARGETS = dict(spill_bytes=0, mufu_per_elem=2.5)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def _table(head: list[str], rows: list[list]) -> str:
    return "\n".join("|" + "|".join(f" {c} " for c in r) + "|" for r in [head, ["---"] * len(head), *rows])


def _g(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _na(x) -> str:
    return "n/a" if x is None else str(x)


def _targets(v: dict) -> list[str]:
    if tuple(v["shape"][2:]) != (32000,) or v["dtype"] != "bf16":
        return []
    p, ok = v["passes"], {True: "met", False: "MISSED", None: "unknown (no ptxas report)"}
    spill = None if None in [q["spill"] for q in p.values()] else max(q["spill"] for q in p.values())
    mufu = p["forward"]["mufu"] + p["backward"]["mufu"]
    lines = [f"spills (ptxas): {spill} B (target 0): {ok[None if spill is None else spill <= TARGETS['spill_bytes']]}",
             f"MUFU per logit element, forward + backward: {mufu:.2f} (target <= {TARGETS['mufu_per_elem']}): "
             f"{ok[mufu <= TARGETS['mufu_per_elem']]}"]
    lines += [f"{ph}: issue {_g(p[ph]['issue_us'])} us vs DRAM {_g(p[ph]['dram_us'])} us (target issue <= DRAM): "
              f"{ok[p[ph]['issue_le_dram']]}" for ph in ("forward", "backward")]
    return [f"- {v['name']}: " + "; ".join(lines)]


def render(results: list[dict]) -> str:
    out, per_elem = [], lambda k, v: k["grid"] * k["warps"] * 32 / math.prod(v["shape"])  # threads per element
    for r in results:
        out += [f"## Triton {r['triton']} (ptxas {r['ptxas']}, sm_{r['arch']})", ""]
        rows = [[v["name"], ph[:3], p["launches"], p["main"], p["regs"], p["shared"], p["stack"], _na(p["spill"]),
                 p["stl_ldl"], _g(p["instr"]), _g(p["mufu"]),
                 " ".join(f"{k} {_g(n)}" for k, n in p["mufu_kinds"].items()), _g(p["lmem"]), _g(p["issue_us"]),
                 _g(p["mufu_us"]), _g(p["bytes"] / 1e6), _g(p["dram_us"]), "yes" if p["issue_le_dram"] else "**no**"]
                for v in r["variants"] for ph, p in v["passes"].items()]
        out += [_table(["variant", "pass", "launches", "main kernel", "regs", "smem B", "stack B", "spill B (ptxas)",
                        "STL+LDL (static)", "instr/elem", "MUFU/elem", "MUFU kinds /elem", "LDL+STL /elem", "issue us",
                        "MUFU us", "DRAM MB", "DRAM us", "issue <= DRAM"], rows), ""]
        targets = [t for v in r["variants"] for t in _targets(v)]
        out += ["Targets at C=32000, bf16:", "", *targets, ""] if targets else []
        rows = [[v["name"], k["phase"][:3], k["kernel"], f"{k['grid']} x {k['warps']}w", k["reg"], k["stack"],
                 k["local"], "/".join(str(k["ptxas"][x]) for x in ("spill_st", "spill_ld")) if k["ptxas"] else "n/a",
                 k["stl_ldl"], k["shared"], _g(k["per_thread"]), _g(k["per_thread"] * per_elem(k, v)),
                 _g(sum(n for op, n in k["ops"].items() if op.startswith("MUFU")) * per_elem(k, v)),
                 "; ".join(f"{lp['where']} {_na(lp['trip'])} x {lp['body']}"
                           + ("" if lp["counted"] else " (not counted)") for lp in k["loops"]) or "-",
                 "; ".join(k["notes"]) or "-"]
                for v in r["variants"] for k in v["kernels"]]
        out += ["Per kernel (loops: source `for`, trip x static body instructions; instr/thread: averaged over the "
                "grid):", "", _table(["variant", "pass", "kernel", "grid x warps", "regs", "stack B", "local B",
                                      "spill st/ld B (ptxas)", "STL+LDL (static)", "smem B", "instr/thread",
                                      "instr/elem", "MUFU/elem", "loops", "notes"], rows), ""]
    return "\n".join(out)


def _commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" (kernels/ modified)" if git(
        "status", "--porcelain", "kernels") else "")


def markdown(results: list[dict], argv: list[str], hw: dict, model_doc: str) -> str:
    """`model_doc`: aot_check's docstring, whose part from "Per kernel:" states the model."""
    model = model_doc.split("Per kernel:")[1].split("Exit status")[0].rstrip()
    model += "\nSASS model (kernels/aot/sass.py):\n" + aot_sass.__doc__.split("\n", 2)[2].rstrip()
    head = [f"# Fused-loss kernels compiled offline: SASS counts and the performance proxy ({datetime.date.today()})",
            "", f"Command: `python -m kernels.aot.check {' '.join(argv)}` at commit {_commit()}. No GPU was used: "
            "every figure below is a compiler output or a prediction of the model, not a measurement.", "",
            f"Model parameters: {hw['sms']} SMs, {hw['clock_ghz']} GHz, {hw['dram_tbs']} TB/s copy bandwidth "
            "(read + written).", "", "```text", "Per kernel:" + model, "```", ""]
    return "\n".join(head) + "\n" + render(results)
