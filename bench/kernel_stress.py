"""The fused loss under real concurrency: the GPU check's `stress` step (kernels/multi_exit/forward.py says what it
tests).

    python -m bench.kernel_stress --out DIR [--seconds 45] [--max-configs 400] [--repeats 3] [--seed 0]

Random configurations (exits, rows, classes, feature width, dtype, teacher, hint, temperature, smoothing) are drawn
so that the forward's grid runs from 1 program to many times the SM count; each runs forward + backward `repeats`
times. Every repeat must equal the first bit for bit (the fixed-order reduction is meant to be deterministic), and
the first must match the float64 reference (kernels/multi_exit/reference.py) within the tolerances of the fused
loss's check at first use (engine/objectives/self_check.py). On CUDA two more checks run: the same plan launched on
two streams at once, and a CUDA graph of a step that calls the op twice, replayed on fresh inputs; both bitwise
against eager launches. On CPU (the rehearsal, Triton interpreter) the sizes are toys and the stream and graph
checks say n/a. Writes `report.json` and `report.md`; exit 1 if anything disagrees.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from bench.report import provenance
from engine.objectives.self_check import GRAD_RTOL, TERM_ATOL, TERM_RTOL, worst_ratio
from kernels.multi_exit.op import fused_loss, plan_for
from kernels.multi_exit.options import LossOptions
from kernels.multi_exit.reference import multi_exit_loss_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIONS = [
    dict(teacher="none"),
    dict(teacher="none", label_smoothing=0.1, smoothing_convention="all_classes"),
    dict(teacher="deepest", ce_weight=0.9, kd_weight=0.1, temperature=3.0, t_squared=True, hint="sse",
         hint_weight=1e-3),
    dict(teacher="deepest", ce_weight=0.7, kd_weight=0.3, temperature=3.0, kd="soft_ce", hint="l2", hint_weight=0.03),
    dict(teacher="deepest", kd_weight=0.5, temperature=2.5, hint="mse", hint_weight=0.1),
    dict(teacher="logits", ce_weight=1.0, kd_weight=1.0, temperature=4.0, t_squared=True),
    dict(teacher="closed_form", ce_weight=0.4, kd_weight=0.6, kd="soft_ce", log_eps=1e-8),
]


def draw(rng: random.Random, cuda: bool, sms: int) -> dict:
    """One random configuration; rows log-uniform from 1 to 16 x the SM count on a GPU."""
    opts = dict(rng.choice(OPTIONS))
    e_min = 2 if opts["teacher"] == "deepest" else 1
    big = cuda and rng.random() < 0.5
    classes = [2, 7, 100, 1000, 4096, 32000] if big else [2, 5, 16, 33, 128] if cuda else [2, 5, 40, 600]
    return {"E": rng.randint(e_min, 8 if cuda else 3),
            "B": max(1, int(round(2 ** rng.uniform(0, math.log2(16 * sms if cuda else 24))))),
            "C": rng.choice(classes),
            "D": rng.choice([1, 16, 64, 512] if cuda else [1, 4, 9]), "dtype": rng.choice(DTYPES), "opts": opts}


def inputs(cfg: dict, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    E, B, C, D, dt = cfg["E"], cfg["B"], cfg["C"], cfg["D"], cfg["dtype"]
    y = torch.randint(0, C, (B,), generator=g)
    y[torch.rand(B, generator=g) < 0.1] = -100  # some ignored rows
    return {"logits": [(torch.randn(B, C, generator=g) * 3).to(device, dt).requires_grad_() for _ in range(E)],
            "features": [torch.randn(B, D, generator=g).relu().to(device, dt).requires_grad_() for _ in range(E)],
            "targets": y.to(device), "teacher_logits": (torch.randn(B, C, generator=g) * 3).to(device, dt),
            "soft_b": torch.rand(B, generator=g).to(device)}


def run_fused(inp: dict, opts: LossOptions) -> list[torch.Tensor]:
    """losses [E, 3] and every input gradient of one forward + backward."""
    for t in inp["logits"] + inp["features"]:
        t.grad = None
    total, losses = fused_loss(inp["logits"], inp["targets"], opts, features=inp["features"],
                               teacher_logits=inp["teacher_logits"], soft_b=inp["soft_b"])
    total.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in inp["logits"] + inp["features"]]
    return [losses.detach().clone(), *[g.clone() for g in grads]]


def reference(inp: dict, opts: dict) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inp["logits"] + inp["features"]]
    E = len(inp["logits"])
    losses = multi_exit_loss_reference(leaves[:E], inp["targets"], features=leaves[E:],
                                       teacher_logits=inp["teacher_logits"], soft_b=inp["soft_b"], **opts)
    losses.sum().backward()
    return [losses.detach(), *[t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]]


def compare(got: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype) -> float:
    """The largest error over the terms and gradients, as a multiple of its tolerance (<= 1 passes)."""
    worst = worst_ratio(got[0], ref[0], TERM_RTOL, TERM_ATOL)[0]
    rtol = GRAD_RTOL[dtype]
    for a, b in zip(got[1:], ref[1:]):
        worst = max(worst, worst_ratio(a.float(), b, rtol, rtol * float(b.abs().max()))[0])
    return worst


def bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def two_streams(cfg: dict, opts: LossOptions, device: torch.device, seed: int) -> bool:
    """The same plan on two streams at once, each against its own eager result."""
    a, b = inputs(cfg, device, seed), inputs(cfg, device, seed + 1)
    want = [run_fused(a, opts), run_fused(b, opts)]
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    with torch.cuda.stream(s1):
        got_a = run_fused(a, opts)
    with torch.cuda.stream(s2):
        got_b = run_fused(b, opts)
    torch.cuda.synchronize(device)
    return bitwise(got_a, want[0]) and bitwise(got_b, want[1])


def graph_replay(cfg: dict, opts: LossOptions, device: torch.device, seed: int, replays: int = 5) -> bool:
    """A CUDA graph of a step that calls the op twice (forward only: the ticket is the forward's), replayed on
    fresh inputs copied into its static ones; every replay bitwise equal to eager calls on the same inputs."""
    static = inputs(cfg, device, seed)
    zs, y = [z.detach() for z in static["logits"]], static["targets"]

    def step():
        t1, l1 = fused_loss(zs, y, opts, features=[f.detach() for f in static["features"]],
                            teacher_logits=static["teacher_logits"], soft_b=static["soft_b"])
        t2, l2 = fused_loss(zs[::-1], y, opts, features=[f.detach() for f in static["features"]],
                            teacher_logits=static["teacher_logits"], soft_b=static["soft_b"])
        return torch.stack([t1, t2]), torch.stack([l1, l2])
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture: plans and scratch made
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for r in range(replays):
        fresh = inputs(cfg, device, seed + 100 + r)
        for z, f in zip(zs, fresh["logits"]):
            z.copy_(f.detach())
        graph.replay()
        want = step()
        if not (torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=45.0, help="stop drawing configurations after this long")
    p.add_argument("--max-configs", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3, help="launches of each configuration, compared bitwise")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 1
    rng = random.Random(args.seed)
    t0, rows, failures, launches = time.perf_counter(), [], [], 0
    while len(rows) < args.max_configs and time.perf_counter() - t0 < args.seconds:
        cfg = draw(rng, cuda, sms)
        opts = LossOptions(**cfg["opts"])
        inp = inputs(cfg, device, args.seed + len(rows))
        first = run_fused(inp, opts)
        grid = plan_for(opts, inp["logits"], inp["targets"], inp["features"] if opts.hint != "none" else [],
                        inp["teacher_logits"] if opts.teacher == "logits" else None,
                        inp["soft_b"] if opts.teacher == "closed_form" else None).grid[0]  # the cached plan
        same = all(bitwise(run_fused(inp, opts), first) for _ in range(args.repeats - 1))
        launches += 2 * args.repeats
        err = compare(first, reference(inp, cfg["opts"]), cfg["dtype"])
        row = {"E": cfg["E"], "B": cfg["B"], "C": cfg["C"], "D": cfg["D"],
               "dtype": str(cfg["dtype"]).removeprefix("torch."), "teacher": cfg["opts"]["teacher"],
               "hint": cfg["opts"].get("hint", "none"), "grid": grid, "err_over_tol": err, "bitwise": same}
        if cuda and len(rows) % 10 == 0:
            row["two_streams"] = two_streams(cfg, opts, device, args.seed + len(rows))
            row["graph_replay"] = graph_replay(cfg, opts, device, args.seed + len(rows))
            launches += 4 * args.repeats + 12
        if err > 1 or not same or row.get("two_streams") is False or row.get("graph_replay") is False:
            failures.append(row)
        rows.append(row)
    grids = [r["grid"] for r in rows]
    report = {"provenance": provenance(device), "device": str(device), "sms": sms, "configs": len(rows),
              "launches": launches, "seconds": round(time.perf_counter() - t0, 1),
              "grid_programs": {"min": min(grids, default=0), "max": max(grids, default=0)},
              "dtypes": sorted({r["dtype"] for r in rows}),
              "max_err_over_tol": max((r["err_over_tol"] for r in rows), default=0.0),
              "bitwise_repeats": all(r["bitwise"] for r in rows),
              "two_streams": [r["two_streams"] for r in rows if "two_streams" in r] or "n/a: needs a GPU",
              "graph_replay": [r["graph_replay"] for r in rows if "graph_replay" in r] or "n/a: needs a GPU",
              "failures": failures, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    md = (f"# Fused loss stress test on {device} ({sms} SMs)\n\n{len(rows)} configurations, {launches} launches in "
          f"{report['seconds']} s; forward grids of {report['grid_programs']['min']} to "
          f"{report['grid_programs']['max']} programs; dtypes {', '.join(report['dtypes'])}.\n\n"
          f"- largest error against float64, as a multiple of its tolerance: {report['max_err_over_tol']:.3g}\n"
          f"- repeats bitwise equal: {report['bitwise_repeats']}\n"
          f"- two streams at once: {report['two_streams']}\n- CUDA-graph replays: {report['graph_replay']}\n"
          f"- failures: {len(failures)}\n")
    (args.out / "report.md").write_text(md)
    print(md)
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
