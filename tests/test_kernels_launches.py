"""What the fused loss costs besides its arithmetic: device operations per step, memory kept between the passes,
and fp16 gradients under a loss scale. The launches are stubbed (bench/host_overhead.py) where only the host side is
under test, so these run at full speed on CPU and on a GPU alike."""
from __future__ import annotations

import os

import pytest
import torch

from bench.host_overhead import byot_step, count
from kernels.multi_exit.op import multi_exit_loss
from kernels.multi_exit.reference import multi_exit_loss_reference

pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning:triton.runtime.interpreter"),
              pytest.mark.usefixtures("one_thread")]
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def test_byot_objective_step_is_two_launches_and_the_backward_seed():
    """Forward + backward of the BYOT objective through the fused path: the forward kernel, the backward kernel and
    the fill of `total.backward()`'s seed gradient; no zero-fill, copy, select or sum around them."""
    fused = count(byot_step(device=DEVICE))
    assert fused["triton"] == 2
    assert fused["aten"] == ["ones_like"]
    assert fused["launches"] == 3
    eager = count(byot_step(device=DEVICE, backend="torch"))
    assert eager["triton"] == 0 and eager["launches"] > 100  # the eager reference, for scale


def test_peak_extra_memory_is_the_gradient():
    """Everything the op allocates over forward + backward: the logits' and features' gradients it returns, and
    per-row statistics (E * 5 + 2 fp32 values per row) kept between the passes; no saved [E, B, C] buffer."""
    E, B, C, D = 4, 256, 1000, 512
    got = count(byot_step(num_exits=E, batch=B, classes=C, dim=D, dtype=torch.bfloat16, device=DEVICE))
    grads = E * B * (C + D) * 2
    stats = ((5 * E + 2) * B + E + 1) * 4
    outputs = (1 + 3 * E) * 4
    assert got["allocated_bytes"] == grads + stats + outputs
    assert got["allocated_bytes"] <= 1.01 * grads


def test_fp16_gradients_do_not_underflow_under_a_loss_scale():
    """Unscaled, these gradients (~1e-9) are below fp16's smallest subnormal; a GradScaler's 2^16 brings them into
    range. The upstream gradient is folded in before rounding, so they come out as the reference's, not as 0."""
    g = torch.Generator().manual_seed(0)
    B, C = 64, 50
    logits = [(torch.randn(B, C, generator=g) * 2).half().to(DEVICE).requires_grad_() for _ in range(2)]
    y = torch.randint(0, C, (B,), generator=g).to(DEVICE)
    opts = dict(teacher="deepest", ce_weight=1e-6, kd_weight=1e-6, temperature=2.0)
    scale = torch.full((2, 3), 2.0**16, device=DEVICE)
    multi_exit_loss(logits, y, **opts).backward(scale)
    ref = [z.detach().clone().requires_grad_() for z in logits]
    multi_exit_loss_reference(ref, y, **opts).backward(scale.double())
    unscaled = ref[0].grad.float() / 2.0**16
    assert (unscaled.abs() < 6e-8).float().mean() > 0.5  # most would flush to zero in fp16 without the scale
    for z, r in zip(logits, ref):
        assert z.grad.dtype == torch.float16
        nonzero = r.grad != 0
        assert (z.grad[nonzero] != 0).all()
        torch.testing.assert_close(z.grad.float(), r.grad.float(), rtol=2**-10, atol=2**-24 * 2**16)
