"""The fused loss checks itself at first use: once per launch plan, against the objective's PyTorch twin.

The first time an objective's fused call meets a new plan (the shapes, dtypes and devices of its inputs: what the
kernels' own plan cache keys on), the same batch also goes, detached, through the fused call and through the
objective's `torch_terms` in fp32 with autocast off, and the terms and the input gradients are compared:

- terms: within 1e-3 relative + 1e-6 absolute, whatever the dtype (the kernels compute in fp32 from the inputs
  as loaded; a KL term is a difference of larger sums, hence 1e-3 and not fp32's 1e-6);
- gradients: within r relative + r * max|reference| absolute, with r = 1e-4 for fp32 inputs and one unit in the
  last place of the gradient's dtype at 1.0 otherwise (2^-7 for bf16, 2^-10 for fp16): the kernels round each gradient
  once to the input's dtype.

A plan that passes keeps the fused call; its later calls cost one dict lookup. On a mismatch, `objective.backend=auto`
falls back to the PyTorch twin for that plan and prints one line naming the plan, the largest error and its
tolerance; an explicit `triton` stops with a ConfigError instead. Under torch.distributed the ranks all-reduce
the verdict (MIN) before acting on it, so no run mixes backends across ranks. Every outcome is kept in
`report`, which the run writes into summary.json and meta.json. The check reads its results on the host: one
synchronisation per plan, never per step.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from engine.config import ConfigError

TERM_RTOL, TERM_ATOL = 1e-3, 1e-6
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _leaves(args: tuple, kwargs: dict) -> list[Any]:
    """The call's arguments flattened one level (the objectives pass tensors, lists of tensors and None)."""
    out: list[Any] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def plan_key(args: tuple, kwargs: dict) -> tuple:
    return (tuple(kwargs), *((a.shape, a.dtype, a.device) if isinstance(a, Tensor) else a
                             for a in _leaves(args, kwargs)))


def _clone_args(args: tuple, kwargs: dict, fp32: bool) -> tuple[tuple, dict, list[Tensor]]:
    """Detached copies of the arguments (fp32 ones with `fp32`); those that required grad require it again."""
    grads: list[Tensor] = []

    def one(t):
        if not isinstance(t, Tensor):
            return t
        c = t.detach().clone()
        if fp32 and c.is_floating_point():
            c = c.float()
        if t.requires_grad:
            c.requires_grad_(True)
            grads.append(c)
        return c

    def tree(a):
        return type(a)(one(t) for t in a) if isinstance(a, (list, tuple)) else one(a)

    return tuple(tree(a) for a in args), {k: tree(v) for k, v in kwargs.items()}, grads


def worst_ratio(got: Tensor, ref: Tensor, rtol: float, atol: float) -> tuple[float, float, float]:
    """(largest |got - ref| / (atol + rtol |ref|), that error, that tolerance); NaN anywhere counts as infinite."""
    got, ref = got.detach().double(), ref.detach().double()
    err = (got - ref).abs()
    tol = atol + rtol * ref.abs()
    ratio = torch.where(torch.isfinite(err), err / tol, torch.full_like(err, float("inf")))
    i = int(ratio.flatten().argmax())
    return float(ratio.flatten()[i]), float(err.flatten()[i]), float(tol.flatten()[i])


def describe(args: tuple, kwargs: dict) -> str:
    shapes = [f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in _leaves(args, kwargs)
              if isinstance(t, Tensor) and t.is_floating_point()]
    return f"{len(shapes)} float inputs: " + ", ".join(dict.fromkeys(shapes))


class SelfCheckedCall:
    """`fused` while it agrees with `reference` on each new plan; see the module doc."""

    def __init__(self, fused: Callable, reference: Callable, name: str, explicit: bool, report: list[dict]):
        self.fused, self.reference, self.name, self.explicit, self.report = fused, reference, name, explicit, report
        self.verdicts: dict[tuple, bool] = {}

    def __call__(self, *args, **kwargs):
        key = plan_key(args, kwargs)
        ok = self.verdicts.get(key)
        if ok is None:
            ok = self.verdicts[key] = self._check(args, kwargs)
        return (self.fused if ok else self.reference)(*args, **kwargs)

    def _check(self, args: tuple, kwargs: dict) -> bool:
        fa, fk, fg = _clone_args(args, kwargs, fp32=False)
        ra, rk, rg = _clone_args(args, kwargs, fp32=True)
        device = next(t.device for t in _leaves(args, kwargs) if isinstance(t, Tensor))
        with torch.autocast(device.type, enabled=False):
            f_total, f_terms = self.fused(*fa, **fk)
            r_total, r_terms = self.reference(*ra, **rk)
        worst = (0.0, 0.0, 0.0, "")
        if set(f_terms) != set(r_terms):
            worst = (float("inf"), float("nan"), 0.0, f"term names {sorted(f_terms)} vs {sorted(r_terms)}")
        else:
            for k in r_terms:
                w = worst_ratio(f_terms[k], r_terms[k], TERM_RTOL, TERM_ATOL)
                worst = max(worst, (*w, f"term {k}"))
            f_grads = torch.autograd.grad(f_total, fg, allow_unused=True) if fg else ()
            r_grads = torch.autograd.grad(r_total, rg, allow_unused=True) if rg else ()
            for i, (a, b, src) in enumerate(zip(f_grads, r_grads, fg)):
                if a is None or b is None:
                    if (a is None) != (b is None) and (b if a is None else a).abs().max() > 0:
                        worst = max(worst, (float("inf"), float("nan"), 0.0, f"gradient of input {i} missing"))
                    continue
                rtol = GRAD_RTOL.get(src.dtype, 1e-4)
                w = worst_ratio(a, b, rtol, rtol * float(b.abs().max()))
                worst = max(worst, (*w, f"gradient of input {i}"))
        ok = worst[0] <= 1.0
        if dist.is_available() and dist.is_initialized():  # every rank takes the same backend for this plan
            flag = torch.tensor([int(ok)], device=device if dist.get_backend() != "gloo" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        plan = describe(args, kwargs)
        entry = {"objective": self.name, "plan": plan, "ok": ok, "backend": "triton" if ok else "torch",
                 "worst": worst[3], "error": worst[1], "tolerance": worst[2]}
        self.report.append(entry)
        if not ok:
            msg = (f"the fused {self.name} loss disagrees with PyTorch on {plan}: {worst[3]} off by {worst[1]:.3g} "
                   f"(tolerance {worst[2]:.3g})")
            if self.explicit:
                raise ConfigError(f"objective.backend=triton: {msg}; use objective.backend=auto or torch")
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"objective.backend=auto: {msg}; PyTorch computes this plan from now on", flush=True)
        return ok


def arm(objective, backend: str, enabled: bool) -> Optional[list[dict]]:
    """Wrap the fused call of `objective` and of every objective inside it; returns the shared report (None when
    nothing runs fused or the check is off)."""
    if not enabled:
        return None
    report: list[dict] = []
    armed = False
    for m in objective.modules():
        if getattr(m, "fused", None) is not None and not isinstance(m.compute, SelfCheckedCall):
            m.compute = SelfCheckedCall(m.compute, m.torch_terms, type(m).__name__, backend == "triton", report)
            armed = True
    return report if armed else None
