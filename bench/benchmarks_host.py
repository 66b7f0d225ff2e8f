"""Host time of the fused loss under pytest-benchmark, launches stubbed (bench/host_overhead.py). Kept out of
`make test` (which collects tests/ only); run it on its own:

    TRITON_INTERPRET=1 pytest bench/benchmarks_host.py --benchmark-only     # CPU: the interpreter selects the path
    pytest bench/benchmarks_host.py --benchmark-only                        # GPU: real CUDA tensors, stubbed launches

The target (<= 60 us per BYOT forward + backward on the project's 2-core machine) is judged by
`selfdistill bench host-overhead`, not here.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.host_overhead import byot_step, stubbed_launches
from bench.kernels_measure import byot_defaults
from kernels.multi_exit.op import fused_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


SHAPES = [(4, 256, 1000, 512)] + ([(4, 4096, 32000, 512)] if DEVICE.type == "cuda" else [])  # 2 GB of logits


@pytest.mark.parametrize("shape", SHAPES, ids=["headline", "large"][:len(SHAPES)])
def test_byot_fused_step_host_time(benchmark, shape):
    e, b, c, d = shape
    step = byot_step(num_exits=e, batch=b, classes=c, dim=d, device=DEVICE)
    step()
    with stubbed_launches():
        benchmark(step)


def test_fused_loss_op_host_time(benchmark):
    """The op alone, without the objective: fused_loss forward + total.backward()."""

    opts = byot_defaults(4)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(256, 1000, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(4)]
    f = [torch.randn(256, 512, generator=g).relu().to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(4)]
    y = torch.randint(0, 1000, (256,), generator=g).to(DEVICE)

    def step():
        for t in z + f:
            t.grad = None
        fused_loss(z, y, opts, features=f)[0].backward()

    step()
    with stubbed_launches():
        benchmark(step)
