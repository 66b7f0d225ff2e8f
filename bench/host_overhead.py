"""Host time and device operations of one fused-loss forward + backward, with the Triton launches stubbed out.

`selfdistill bench host-overhead` writes the report (`kernels-host-<date>-<device>/`).

`host_us` is our own host code per forward + backward with the two launches replaced by no-ops; `launches` counts
the device operations that read or write memory (the Triton launches plus every other aten op; views, allocations
and metadata are free). The stubs make both independent of the device and of the interpreter; on a GPU, Triton's
launcher comes on top. tests/test_kernels_launches.py and bench/benchmarks_host.py (pytest-benchmark) use the same
calls; the op counter is bench.measure.OpCounter.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from bench.measure import OpCounter, median_p20_p80
from bench.report import base_parser, fail, log, md_table, provenance, provenance_md, start, write_report


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[str]]:
    """Replace the fused kernels' launches by no-ops that record the kernel's name."""
    from kernels.multi_exit import backward as bwd  # triton, optional: only when the report is asked for
    from kernels.multi_exit import forward as fwd

    launched: list[str] = []

    class Stub:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.fn.__name__)

    saved = fwd._fwd_kernel, bwd._bwd_kernel
    fwd._fwd_kernel, bwd._bwd_kernel = Stub(saved[0]), Stub(saved[1])
    try:
        yield launched
    finally:
        fwd._fwd_kernel, bwd._bwd_kernel = saved


def byot_step(num_exits: int = 4, batch: int = 256, classes: int = 1000, dim: int = 512,
              dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", backend: str = "triton",
              self_check: bool = False) -> Callable[[], None]:
    """One forward + backward of the BYOT objective's loss (engine defaults) on fixed exit tensors. The check at
    first use is off unless asked for: under stubbed launches it would see no kernel results; with it on, call
    the step once for real before stubbing, and the check's verdict is then a dict lookup per call."""
    # the objectives load the kernels (triton): after the interpreter is chosen, as above
    from engine.config import load_config
    from engine.objectives import build_objective
    from engine.types import Batch, ExitOutputs

    cfg = load_config(None, [f"objective.backend={backend}", f"objective.self_check={str(self_check).lower()}"])
    objective = build_objective(cfg, num_exits, torch.device(device))
    g = torch.Generator().manual_seed(0)
    logits = [(torch.randn(batch, classes, generator=g) * 3).to(device, dtype).requires_grad_()
              for _ in range(num_exits)]
    feats = [torch.randn(batch, dim, generator=g).relu().to(device, dtype).requires_grad_() for _ in range(num_exits)]
    out = ExitOutputs(logits, feats)
    b = Batch(torch.empty(0, device=device), torch.randint(0, classes, (batch,), generator=g).to(device))

    def step() -> None:
        for t in logits + feats:  # zero_grad(set_to_none=True): gradients are assigned, not accumulated
            t.grad = None
        objective.loss(out, b).total.backward()

    return step


class _Null(torch.autograd.Function):
    """What any autograd op of the fused loss's arity costs PyTorch: the same inputs and outputs, no work."""

    @staticmethod
    def forward(ctx, targets, *tensors):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(targets, *tensors)
        return torch.empty(()), torch.empty(len(tensors) // 2, 3)

    @staticmethod
    def backward(ctx, g_total, g_losses):
        return (None, *(torch.empty_like(t) for t in ctx.saved_tensors[1:]))  # any op must allocate its gradients


def torch_floor_step(num_exits: int = 4, batch: int = 256, classes: int = 1000, dim: int = 512,
                     dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> Callable[[], None]:
    """`byot_step`'s autograd without any of our code: a no-op Function on the same tensors, then backward()."""
    leaves = [torch.empty(batch, n, dtype=dtype, device=device).requires_grad_() for n in [classes] * num_exits +
              [dim] * num_exits]
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        for t in leaves:
            t.grad = None
        _Null.apply(y, *leaves)[0].backward()

    return step


def count(step: Callable[[], None]) -> dict:
    """Launches and other memory-touching ops of one call, with the fused kernels stubbed."""
    with stubbed_launches() as launched:
        step()  # warm-up: per-configuration plans and their scratch buffers
        launched.clear()
        with OpCounter() as ops:
            step()
    return {"triton": len(launched), "aten": ops.ops, "launches": len(launched) + len(ops.ops),
            "allocated_bytes": ops.allocated}


def host_us(step: Callable[[], None], reps: int = 200) -> dict:
    """Median and p20/p80 host microseconds per call, the launches stubbed."""
    with stubbed_launches():
        for _ in range(max(3, reps // 10)):
            step()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e6)
    median, p20, p80 = median_p20_p80(times)
    return {"median": median, "p20": p20, "p80": p80, "reps": reps}


def host_report(device: torch.device, reps: int, out_dir: Path) -> dict:
    """The report: the fused BYOT objective against the eager one, same shape and inputs."""
    fused, eager = byot_step(device=device), byot_step(device=device, backend="torch")
    counts, host, floor = count(fused), host_us(fused, reps), host_us(torch_floor_step(device=device), reps)
    own = host["median"] - floor["median"]
    payload = {"provenance": provenance(device), "rows": [], "shape": "E=4 B=256 C=1000 D=512 bf16, BYOT defaults",
               "host_us": host, "torch_floor_us": floor, "own_host_us": own, "launches": counts["launches"],
               "triton_launches": counts["triton"], "other_ops": counts["aten"],
               "eager_launches": count(eager)["launches"], "target": {"own_host_us": 60.0, "launches": 3}}
    md = "\n".join([
        "# Fused multi-exit loss: host overhead", "", provenance_md(payload["provenance"]),
        f"BYOT objective, {payload['shape']}, one forward + backward (`total.backward()`), the two Triton launches "
        f"stubbed; {reps} calls each. The PyTorch floor is the same autograd (a no-op Function of the same inputs "
        "and outputs, then backward()): what any autograd op costs; the difference is our own code.", "",
        md_table(["path", "host us (median)", "p20 / p80", "device ops that touch memory", "target"],
                 [["fused", f"{host['median']:.1f}", f"{host['p20']:.1f} / {host['p80']:.1f}",
                   f"{counts['launches']} ({counts['triton']} Triton + {', '.join(counts['aten']) or 'none'})",
                   "<= 3 device ops"],
                  ["PyTorch floor (no-op Function)", f"{floor['median']:.1f}",
                   f"{floor['p20']:.1f} / {floor['p80']:.1f}", "-", "-"],
                  ["our own code (fused - floor)", f"{own:.1f}", "-", "-", "<= 60 us"],
                  ["eager PyTorch objective", "-", "-", payload["eager_launches"], "-"]])])
    payload["written"] = write_report(out_dir, payload, md)
    log(f"host overhead: {host['median']:.1f} us per fwd+bwd ({own:.1f} us our own code over a PyTorch floor of "
        f"{floor['median']:.1f} us), {counts['launches']} device ops; "
        f"report: {payload['written']['markdown']}")
    return payload


def run(argv: Optional[list[str]]) -> dict:
    """Measure and write the report; its payload, with the written paths."""
    p = base_parser("selfdistill bench host-overhead", __doc__, repeats=1)
    p.add_argument("--reps", type=int, default=500, help="timed calls of the fused forward + backward")
    args = p.parse_args(argv)
    device, out_dir = start(args, "kernels-host")
    from bench.kernels_measure import fused_runs

    if not fused_runs(device):
        fail("bench host-overhead: the fused kernel needs TRITON_INTERPRET=1 on CPU")
    return host_report(device, args.reps, out_dir)


def main(argv: Optional[list[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
