"""The fused multi-exit loss: every CE / KD / hint term of up to 8 exits, forward in one launch, backward in one.

    total, losses = fused_loss(logits, targets, opts, features=None, teacher_logits=None, soft_b=None)

`opts` is a kernels.options.LossOptions (the terms are defined there). `total` is the differentiable sum of every
weighted term, `losses` [E, 3] fp32 the terms themselves (ce, kd, hint per exit; differentiable too). An objective
backpropagates through `total` and logs `losses` detached: then forward + backward is two Triton launches plus the
one fill of `total.backward()`. `multi_exit_loss(logits, targets, **options)` returns `losses` only, and
`MultiExitLoss(**options)` is the nn.Module form.

Inputs: `logits` is a list of E tensors [B, C] (or one [E, B, C] tensor, unbound into views); the kernels take the
exits as separate pointers, so they are never stacked. Rows may be strided; a strided class dimension is made
contiguous. Logits fp32/bf16/fp16 (one dtype for all exits); teacher logits and features any of those; labels any
integer dtype. Gradients come back in the inputs' dtypes, scaled by the upstream gradient before rounding (so fp16
under a GradScaler does not underflow). Teacher logits, soft_b and the deepest exit's features get no gradient.
Nothing is written into an input. No double backward. Out-of-range labels make the CE NaN instead of a device assert.

Eager calls go through a plain torch.autograd.Function with flat tensor arguments; under torch.compile the same
kernels run as the torch.library ops selfdistill::multi_exit_loss / _backward (fake implementations included), so
tracing has no graph break. Validation and launch parameters are computed once per configuration (`_plan`).
One caveat of the single-launch reduction: a scratch buffer and a ticket counter per device are reused by every
call, so two calls must not run concurrently on different streams of one device.
Memory between the passes: per-row statistics only (the gradient is recomputed), so the peak extra memory is the
logits' gradient itself.

Devices: CUDA, or CPU under the Triton interpreter (TRITON_INTERPRET=1 set before importing triton; slow, for tests).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
from torch import Tensor, nn

from kernels import multi_exit_triton as K
from kernels.options import MAX_EXITS, LossOptions, ce_true_mass, options, resolve_weights

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TEACHER = {"none": K.TEACHER_NONE.value, "deepest": K.TEACHER_DEEPEST.value, "logits": K.TEACHER_LOGITS.value,
            "closed_form": K.TEACHER_CLOSED.value}
_HINT = {"none": K.HINT_NONE.value, "sse": K.HINT_SSE.value, "l2": K.HINT_L2.value, "mse": K.HINT_MSE.value}
_ROW_STATS = K.ROW_STATS.value
MAX_POW = 8  # exp(x) as exp(x / T)^T up to this T; above (or a fractional T) the polynomial exp2 takes over


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return
    if device.type == "cpu":
        raise RuntimeError("multi_exit_loss: the Triton kernel needs a CUDA device; on CPU it only runs under the "
                           "Triton interpreter (set TRITON_INTERPRET=1 before importing triton; slow, for tests). "
                           "Use objective.backend=torch on CPU.")
    raise RuntimeError(f"multi_exit_loss: device {device} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)")


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Everything a launch needs that depends only on the configuration: computed and validated once."""

    opts: LossOptions
    E: int
    B: int
    C: int
    D: int
    device: torch.device
    hinted: tuple[bool, ...]  # exits whose features get a gradient
    weights: Tensor  # [E, 3] fp32 on the device
    scalars: tuple  # ignore_index, inv_t, inv_ts, kd_scale, ce_b, log_eps
    inv_bd: float
    meta: dict  # constexprs shared by both kernels
    fwd_meta: dict
    grid: tuple[int]
    stats_size: int
    part_stride: int

    def align(self, *streams: Tensor) -> int:
        """V when every row of the streams starts on a 16-byte vector (vectorised loads), else 1."""
        v = self.meta["V"]
        return v if self.C % v == 0 and all(t.stride(0) % v == 0 for t in streams) else 1


def _pow_of(temperature: float) -> tuple[int, bool]:
    """(POW, TWO): whether a stream needs its softmax at T and at 1, and T as an integer power (0 = fractional)."""
    if temperature == 1.0:
        return 0, False
    t = round(temperature)
    return (t if abs(temperature - t) < 1e-12 and 2 <= t <= MAX_POW else 0), True


def _blocks(B: int, C: int, D: int, itemsize: int, block_c: int) -> tuple[int, int, int, int, int]:
    """BLOCK_B, NT, V, BLOCK_D, num_warps. A lane is one 16-byte vector of V classes; a tile is BLOCK_B rows of NT
    lanes. On the GPU a tile holds 2048 elements, one lane per thread (`python -m kernels.aot_check` reports the
    registers); the interpreter prefers few programs with large tiles, since its cost is per op, not per element."""
    tile = 1 << 16 if interpreting() else 2048
    bc = block_c if block_c > 0 else min(triton.next_power_of_2(C), tile)
    v = min(max(1, 16 // itemsize), bc)
    # Several rows per program only for short rows: the per-row statistics of a multi-row block are held by every
    # thread, which at 4 exits costs more registers than the extra programs cost.
    bb = max(1, min(tile // bc, triton.next_power_of_2(B))) if bc < 512 or interpreting() else 1
    nt = bc // v
    bd = max(1, min(triton.next_power_of_2(max(D, 1)), max(16, tile // bb)))
    warps = max(1, min(8, bb * nt // 32))
    return bb, nt, v, bd, warps


@functools.lru_cache(maxsize=256)
def _plan(opts: LossOptions, E: int, B: int, C: int, D: int, z_dtype: torch.dtype, f_dtype, t_shape, t_dtype,
          b_shape, b_dtype, y_shape, y_dtype, device: torch.device) -> Plan:
    if not 1 <= E <= MAX_EXITS:
        raise ValueError(f"logits: {E} exits; the fused loss takes 1 to {MAX_EXITS}")
    if C < 2:
        raise ValueError(f"logits: each exit must be [B, C] with C >= 2, got C = {C}")
    if z_dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: dtype {z_dtype} is not supported; use float32, bfloat16 or float16")
    if y_shape != (B,) or y_dtype.is_floating_point or y_dtype == torch.bool:
        raise ValueError(f"targets: expected integer labels of shape ({B},), got {tuple(y_shape)} {y_dtype}")
    _check_device(device)
    if opts.teacher == "deepest" and E < 2:
        raise ValueError("teacher='deepest' needs at least two exits (the deepest one is the teacher)")
    if opts.teacher == "logits" and (t_shape != (B, C) or t_dtype not in FLOAT_DTYPES):
        raise ValueError(f"teacher_logits: teacher='logits' needs a float [{B}, {C}] tensor, got "
                         f"{None if t_shape is None else (t_shape, t_dtype)}")
    if opts.teacher == "closed_form" and (b_shape != (B,) or not b_dtype.is_floating_point):
        raise ValueError(f"soft_b: teacher='closed_form' needs a float [{B}] tensor of true-class masses")
    if opts.hint != "none" and f_dtype not in FLOAT_DTYPES:
        raise TypeError(f"features: dtype {f_dtype} is not supported")
    w = resolve_weights(opts, E)
    t = opts.temperature
    ts = opts.student_temperature if opts.teacher != "none" else 1.0
    pow_s, two_s = _pow_of(ts)
    pow_t, two_t = _pow_of(t) if opts.teacher == "deepest" else (0, False)
    ce_b = ce_true_mass(opts, C)
    eps = K.EPS_NONE.value
    if opts.log_eps > 0:
        eps = (K.EPS_KD if opts.log_eps_on_kd else K.EPS_CE).value
    bb, nt, v, bd, warps = _blocks(B, C, D, z_dtype.itemsize, opts.block_c)
    grid = (triton.cdiv(B, bb),)
    part_stride = triton.next_power_of_2(3 * E + 1)
    meta = dict(N=E, TEACHER=_TEACHER[opts.teacher], HINT=_HINT[opts.hint], EPS=eps, TWO_S=two_s, TWO_T=two_t,
                BLOCK_B=bb, NT=nt, V=v, BLOCK_D=bd, num_warps=warps)
    fwd_meta = dict(meta, KD_KL=opts.kd == "kl", SMOOTH=ce_b != 1.0, POW_S=pow_s, POW_T=pow_t,
                    PART_STRIDE=part_stride, BLOCK_P=max(1, min(triton.next_power_of_2(grid[0]), 4096 // part_stride)))
    weights = torch.tensor(w, dtype=torch.float32, device=device)  # once per configuration, not per step
    scalars = (opts.ignore_index, 1.0 / t, 1.0 / ts, t * t if opts.t_squared else 1.0, ce_b, opts.log_eps)
    return Plan(opts, E, B, C, D, device, tuple(wh != 0.0 for _, _, wh in w), weights, scalars,
                1.0 / max(B * D, 1), meta, fwd_meta, grid, (_ROW_STATS * E + 2) * B + E + 1, part_stride)


def plan_for(opts: LossOptions, logits: Sequence[Tensor], targets: Tensor, features: Sequence[Tensor],
             teacher_logits: Optional[Tensor], soft_b: Optional[Tensor]) -> Plan:
    """The cached plan of these inputs; the per-call checks are the ones a cache hit cannot vouch for."""
    if not logits:
        raise ValueError("logits: need at least one exit")
    z0 = logits[0]
    if z0.dim() != 2:
        raise ValueError(f"logits: each exit must be [B, C], got {tuple(z0.shape)}")
    for i in range(1, len(logits)):
        z = logits[i]
        if z.shape != z0.shape or z.dtype != z0.dtype or z.device != z0.device:
            raise ValueError(f"logits[{i}]: {tuple(z.shape)} {z.dtype} {z.device} differs from logits[0]: "
                             f"{tuple(z0.shape)} {z0.dtype} {z0.device}")
    B, C = z0.shape
    D, f_dtype = 0, None
    if opts.hint != "none":
        if len(features) != len(logits):
            raise ValueError(f"hint={opts.hint!r} needs features: one [B, D] tensor per exit, got {len(features)} "
                             f"for {len(logits)} exits")
        f0 = features[0]
        D, f_dtype = (f0.shape[1] if f0.dim() == 2 else 0), f0.dtype
        for i, f in enumerate(features):
            if f.dim() != 2 or f.shape != (B, D) or f.dtype != f_dtype or f.device != z0.device:
                raise ValueError(f"features[{i}]: every exit needs the same [B={B}, D] float shape, dtype and "
                                 f"device, got {tuple(f.shape)} {f.dtype} {f.device}")
    for name, t in (("targets", targets), ("teacher_logits", teacher_logits), ("soft_b", soft_b)):
        if t is not None and t.device != z0.device:
            raise ValueError(f"{name}: on {t.device}, the logits are on {z0.device}")
    t_meta = (tuple(teacher_logits.shape), teacher_logits.dtype) if teacher_logits is not None else (None, None)
    b_meta = (tuple(soft_b.shape), soft_b.dtype) if soft_b is not None else (None, None)
    return _plan(opts, len(logits), B, C, D, z0.dtype, f_dtype, *t_meta, *b_meta, tuple(targets.shape),
                 targets.dtype, z0.device)


# --------------------------------------------------------------------------------------------- launches


@functools.lru_cache(maxsize=16)
def _scratch(device: torch.device) -> dict:
    # the ticket must read 0 before a launch: zeroed once here, reset by the last program of every launch
    return {"ticket": torch.zeros(1, dtype=torch.int32, device=device), "part": torch.empty(0, device=device)}


def _part(plan: Plan) -> tuple[Tensor, Tensor]:
    s = _scratch(plan.device)
    need = plan.grid[0] * plan.part_stride
    if s["part"].numel() < need:
        s["part"] = torch.empty(max(need, 2 * s["part"].numel()), dtype=torch.float32, device=plan.device)
    return s["part"], s["ticket"]


def _unit_col(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _streams(plan: Plan, logits, features, teacher_logits, soft_b, targets):
    zs = tuple(_unit_col(z) for z in logits)
    fs = tuple(_unit_col(f) for f in features) if plan.D else zs
    tz = _unit_col(teacher_logits) if teacher_logits is not None else zs[0]
    y = targets if targets.stride(0) == 1 else targets.contiguous()
    brow = soft_b if soft_b is None or soft_b.stride(0) == 1 else soft_b.contiguous()
    return zs, fs, tz, y, brow if brow is not None else plan.weights


def forward(plan: Plan, logits, targets, features, teacher_logits, soft_b) -> tuple[Tensor, Tensor, Tensor]:
    """(total [], losses [E, 3], saved statistics)."""
    zs, fs, tz, y, brow = _streams(plan, logits, features, teacher_logits, soft_b, targets)
    f32 = dict(dtype=torch.float32, device=plan.device)
    total, losses, stats = torch.empty((), **f32), torch.empty((plan.E, 3), **f32), torch.empty(plan.stats_size, **f32)
    part, ticket = _part(plan)
    K._fwd_kernel[plan.grid](
        zs, tuple(z.stride(0) for z in zs), fs, tuple(f.stride(0) for f in fs), tz, tz.stride(0), y, brow,
        plan.weights, stats, part, ticket, total, losses, plan.B, plan.C, plan.D, *plan.scalars, plan.inv_bd,
        ALIGN=plan.align(*zs, tz), **plan.fwd_meta)
    return total, losses, stats


def backward(plan: Plan, grad: Tensor, stats: Tensor, logits, targets, features, teacher_logits,
             soft_b) -> tuple[Tensor, Tensor]:
    """(d logits [E, B, C] in the logits' dtype, d features [E, B, D] in theirs; rows of unhinted exits unset)."""
    zs, fs, tz, y, brow = _streams(plan, logits, features, teacher_logits, soft_b, targets)
    dz = torch.empty((plan.E, plan.B, plan.C), dtype=zs[0].dtype, device=plan.device)
    df = torch.empty((plan.E, plan.B, plan.D), dtype=fs[0].dtype, device=plan.device) if plan.D else dz
    K._bwd_kernel[plan.grid](
        zs, tuple(z.stride(0) for z in zs), fs, tuple(f.stride(0) for f in fs), tz, tz.stride(0), y, brow,
        plan.weights, stats, grad, grad.stride(0), grad.stride(1), dz, df, plan.B, plan.C, plan.D, *plan.scalars,
        ALIGN=plan.align(*zs, tz), **plan.meta)
    return dz, (df if plan.D else None)


def upstream(g_total: Optional[Tensor], g_losses: Optional[Tensor], E: int) -> Optional[Tensor]:
    """[E, 3] fp32 upstream gradient of every term: a broadcast view when only `total` was used (no copy)."""
    if g_total is None:
        return None if g_losses is None else g_losses.float()
    g = g_total.float().expand(E, 3)
    return g if g_losses is None else g + g_losses.float()


# --------------------------------------------------------------------------------------------- eager autograd


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: Plan, targets, teacher_logits, soft_b, *tensors):
        logits, features = tensors[:plan.E], tensors[plan.E:]
        total, losses, stats = forward(plan, logits, targets, features, teacher_logits, soft_b)
        ctx.set_materialize_grads(False)  # unused outputs get no zero-filled gradients
        ctx.plan = plan
        ctx.save_for_backward(stats, targets, teacher_logits, soft_b, *tensors)
        return total, losses

    @staticmethod
    def backward(ctx, g_total, g_losses):
        plan = ctx.plan
        stats, targets, teacher_logits, soft_b, *tensors = ctx.saved_tensors
        n_in = 4 + len(tensors)
        g = upstream(g_total, g_losses, plan.E)
        if g is None:
            return (None,) * n_in
        logits, features = tensors[:plan.E], tensors[plan.E:]
        dz, df = backward(plan, g, stats, logits, targets, features, teacher_logits, soft_b)
        d_feats = [df[e] if h else None for e, h in enumerate(plan.hinted)] if df is not None else \
            [None] * len(features)
        return (None, None, None, None, *dz.unbind(0), *d_feats)


# --------------------------------------------------------------------------------------------- torch.library ops


def _plan_from(logits, targets, features, teacher_logits, soft_b, options_text: str) -> Plan:
    return plan_for(LossOptions.decode(options_text), logits, targets, features, teacher_logits, soft_b)


@torch.library.custom_op("selfdistill::multi_exit_loss", mutates_args=())
def _loss_op(logits: list[Tensor], targets: Tensor, features: list[Tensor], teacher_logits: Optional[Tensor],
             soft_b: Optional[Tensor], options: str) -> tuple[Tensor, Tensor, Tensor]:
    """(total [], losses [E, 3], saved statistics); `options` is LossOptions.encoded."""
    plan = _plan_from(logits, targets, features, teacher_logits, soft_b, options)
    return forward(plan, logits, targets, features, teacher_logits, soft_b)


@_loss_op.register_fake
def _loss_fake(logits, targets, features, teacher_logits, soft_b, options):
    E, (B, C) = len(logits), logits[0].shape
    z = logits[0]
    f32 = dict(dtype=torch.float32)
    return z.new_empty((), **f32), z.new_empty((E, 3), **f32), z.new_empty((_ROW_STATS * E + 2) * B + E + 1, **f32)


@torch.library.custom_op("selfdistill::multi_exit_loss_backward", mutates_args=())
def _backward_op(grad: Tensor, stats: Tensor, logits: list[Tensor], targets: Tensor, features: list[Tensor],
                 teacher_logits: Optional[Tensor], soft_b: Optional[Tensor], options: str) -> tuple[Tensor, Tensor]:
    """(d logits [E, B, C], d features [E, B, D], or an empty tensor without a hint)."""
    plan = _plan_from(logits, targets, features, teacher_logits, soft_b, options)
    dz, df = backward(plan, grad, stats, logits, targets, features, teacher_logits, soft_b)
    return dz, (df if df is not None else dz.new_empty(0))


@_backward_op.register_fake
def _backward_fake(grad, stats, logits, targets, features, teacher_logits, soft_b, options):
    z = logits[0]
    E, (B, C) = len(logits), z.shape
    hint = LossOptions.decode(options).hint != "none"
    df = features[0].new_empty((E, B, features[0].shape[1])) if hint else z.new_empty(0)
    return z.new_empty((E, B, C)), df


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, features, teacher_logits, soft_b, options = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.num_exits, ctx.options = len(logits), options
    ctx.save_for_backward(output[2], targets, teacher_logits, soft_b, *logits, *features)


def _backward_formula(ctx, g_total, g_losses, _):
    stats, targets, teacher_logits, soft_b, *rest = ctx.saved_tensors
    logits, features = rest[:ctx.num_exits], rest[ctx.num_exits:]
    g = upstream(g_total, g_losses, ctx.num_exits)
    dz, df = torch.ops.selfdistill.multi_exit_loss_backward(g, stats, logits, targets, features, teacher_logits,
                                                            soft_b, ctx.options)
    hinted = [w[2] != 0.0 for w in resolve_weights(LossOptions.decode(ctx.options), ctx.num_exits)]
    grad_feats = [df[e] if h else None for e, h in enumerate(hinted)] if features else []
    return list(dz.unbind(0)), None, grad_feats, None, None, None


torch.library.register_autograd("selfdistill::multi_exit_loss", _backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public API


def as_list(x: Sequence[Tensor] | Tensor | None) -> list[Tensor]:
    if x is None:
        return []
    if isinstance(x, Tensor):
        if x.dim() != 3:
            raise ValueError(f"expected a list of [B, N] tensors or one [E, B, N] tensor, got shape {tuple(x.shape)}")
        return list(x.unbind(0))
    return list(x)


def fused_loss(logits: Sequence[Tensor] | Tensor, targets: Tensor, opts: LossOptions, *,
               features: Sequence[Tensor] | Tensor | None = None, teacher_logits: Optional[Tensor] = None,
               soft_b: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(total, losses [E, 3]): see the module docstring."""
    logits = logits if isinstance(logits, list) else as_list(logits)
    feats = (features if isinstance(features, list) else as_list(features)) if opts.hint != "none" else []
    teacher_logits = teacher_logits if opts.teacher == "logits" else None
    soft_b = soft_b if opts.teacher == "closed_form" else None
    if torch.compiler.is_compiling():
        total, losses, _ = torch.ops.selfdistill.multi_exit_loss(logits, targets, feats, teacher_logits, soft_b,
                                                                 opts.encoded)
        return total, losses
    plan = plan_for(opts, logits, targets, feats, teacher_logits, soft_b)
    return _FusedLoss.apply(plan, targets, teacher_logits, soft_b, *logits, *feats)


def multi_exit_loss(logits: Sequence[Tensor] | Tensor, targets: Tensor, *,
                    features: Sequence[Tensor] | Tensor | None = None, teacher_logits: Optional[Tensor] = None,
                    soft_b: Optional[Tensor] = None, opts: Optional[LossOptions] = None, **kwargs) -> Tensor:
    """[E, 3] fp32 losses (ce, kd, hint) per exit, weighted; options as a LossOptions or as keywords."""
    return fused_loss(logits, targets, options(opts, **kwargs), features=features, teacher_logits=teacher_logits,
                      soft_b=soft_b)[1]


class MultiExitLoss(nn.Module):
    """nn.Module form of `multi_exit_loss`: the options are fixed at construction, tensors come per call."""

    def __init__(self, **kwargs):
        super().__init__()
        self.opts = options(**kwargs)

    def forward(self, logits, targets, features=None, teacher_logits=None, soft_b=None) -> Tensor:
        return fused_loss(logits, targets, self.opts, features=features, teacher_logits=teacher_logits,
                          soft_b=soft_b)[1]

    def extra_repr(self) -> str:
        default = LossOptions()
        return ", ".join(f"{k}={v!r}" for k, v in self.opts.as_kwargs().items() if v != getattr(default, k))

