"""The fused multi-exit loss: every CE / KD / hint term of up to 8 exits, forward in one launch, backward in one.

`fused_loss` takes the exits' logits, the labels and a kernels.multi_exit.options.LossOptions (the terms are defined
there), plus the features, teacher logits or per-row targets its options call for. It returns the differentiable sum of
every weighted term and the [E, 3] fp32 terms themselves (ce, kd, hint per exit; differentiable too). An objective
backpropagates through the sum and logs the terms detached: then forward + backward is two Triton launches plus the
one fill of the sum's `backward()`. `multi_exit_loss(logits, targets, **options)` returns the terms only, and
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
The single-launch reduction needs a scratch buffer and a ticket counter per configuration; each CUDA stream that
calls it gets its own pair (`Plan.scratch`, keyed by the current stream's handle), so calls on different streams
may overlap. Per stream rather than refusing a second stream: the check would have to know, without a host sync,
whether a launch is still in flight on another stream, and DDP, CUDA graphs and torch.compile all run work on side
streams. A CUDA graph keeps the pointers of the stream it was captured on; since every launch leaves its ticket at
0, each replay, and a graph that calls the op several times in stream order, starts from 0 too.
Memory between the passes: per-row statistics only (the gradient is recomputed), so the peak extra memory is the
logits' gradient itself.

Devices: CUDA, or CPU under the Triton interpreter (TRITON_INTERPRET=1 set before importing triton; slow, for tests).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import triton
from torch import Tensor, nn

from kernels.multi_exit import backward as bwd
from kernels.multi_exit import forward as fwd
from kernels.multi_exit import tiles as K
from kernels.multi_exit.options import MAX_EXITS, LossOptions, ce_true_mass, options, resolve_weights

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TEACHER = {"none": K.TEACHER_NONE.value, "deepest": K.TEACHER_DEEPEST.value, "logits": K.TEACHER_LOGITS.value,
            "closed_form": K.TEACHER_CLOSED.value}
_HINT = {"none": K.HINT_NONE.value, "sse": K.HINT_SSE.value, "l2": K.HINT_L2.value, "mse": K.HINT_MSE.value}
_ROW_STATS = K.ROW_STATS.value
MAX_POW = 8  # exp(x) as exp(x / T)^T up to this T; above (or a fractional T) the polynomial exp2 takes over


def current_stream_handle(index: int | None) -> int:
    """The raw handle of the current CUDA stream (what Triton's own launcher reads: far cheaper than
    torch.cuda.current_stream())."""
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if index is None else index)


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


class Scalars(NamedTuple):
    """The runtime scalars both kernels take, in their parameter order (`*plan.scalars` at the launch)."""

    ignore_index: int
    inv_t: float  # 1 / the teacher's temperature
    inv_ts: float  # 1 / the students' temperature
    kd_scale: float  # T^2 where the KD term is scaled by it, else 1
    ce_b: float  # the CE target's mass on the label (options.ce_true_mass)
    log_eps: float


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
    scalars: Scalars
    inv_bd: float
    meta: dict  # the backward's constexprs, by ALIGN (1, or V for rows on 16-byte vectors)
    fwd_meta: dict  # the forward's
    grid: tuple[int]
    stats_size: int
    part_stride: int
    row_strides: tuple  # of contiguous logits and features: ((C,) * E, (D,) * E)
    part: Tensor  # fp32 scratch: every program's partial sums (the current stream's: `scratch`)
    ticket: Tensor  # int32 [1], 0 between launches: zeroed once here, reset by each launch's last program
    per_stream: dict  # CUDA stream handle -> (part, ticket) of the streams other than the first one used

    def scratch(self) -> tuple[Tensor, Tensor]:
        """The scratch buffer and ticket of the current CUDA stream: launches of one plan on two streams may
        overlap, and a shared ticket would let one launch's last program reduce the other's partials."""
        if self.device.type != "cuda":
            return self.part, self.ticket  # the interpreter runs launches one after another
        stream = current_stream_handle(self.device.index)
        pair = self.per_stream.get(stream)
        if pair is None:
            if not self.per_stream:  # the first stream takes the buffers made with the plan
                pair = self.per_stream[stream] = (self.part, self.ticket)
            else:
                pair = self.per_stream[stream] = (torch.empty_like(self.part), torch.zeros_like(self.ticket))
        return pair


def _pow_of(temperature: float) -> tuple[int, bool]:
    """(POW, TWO): whether a stream needs its softmax at T and at 1, and T as an integer power (0 = fractional)."""
    if temperature == 1.0:
        return 0, False
    t = round(temperature)
    return (t if abs(temperature - t) < 1e-12 and 2 <= t <= MAX_POW else 0), True


def _blocks(B: int, C: int, D: int, itemsize: int, block_c: int) -> tuple[int, int, int, int, int]:
    """BLOCK_B, NT, V, BLOCK_D, num_warps. A lane is one 16-byte vector of V classes; a tile is BLOCK_B rows of NT
    lanes. On the GPU a tile holds 2048 elements, one lane per thread (`python -m kernels.aot.check` reports the
    registers); the interpreter prefers few programs with large tiles, since its cost is per op, not per element."""
    tile = 1 << 16 if interpreting() else 2048
    bc = block_c if block_c > 0 else min(triton.next_power_of_2(C), tile)
    v = min(max(1, 16 // itemsize), bc)
    # Several rows per program only for short rows: the per-row statistics of a multi-row block are held by every
    # thread, which at 4 exits costs more registers than the extra programs cost.
    bb = max(1, min(tile // bc, triton.next_power_of_2(B))) if bc < 512 else 1
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
    if tuple(y_shape) != (B,) or y_dtype.is_floating_point or y_dtype == torch.bool:
        raise ValueError(f"targets: expected integer labels of shape ({B},), got {tuple(y_shape)} {y_dtype}")
    _check_device(device)
    if opts.teacher == "deepest" and E < 2:
        raise ValueError("teacher='deepest' needs at least two exits (the deepest one is the teacher)")
    if opts.teacher == "logits" and (t_shape is None or tuple(t_shape) != (B, C) or t_dtype not in FLOAT_DTYPES):
        raise ValueError(f"teacher_logits: teacher='logits' needs a float [{B}, {C}] tensor, got "
                         f"{None if t_shape is None else (tuple(t_shape), t_dtype)}")
    if opts.teacher == "closed_form" and (b_shape is None or tuple(b_shape) != (B,) or not b_dtype.is_floating_point):
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
    fwd_meta, meta = ({a: dict(m, ALIGN=a) for a in (1, v)} for m in (fwd_meta, meta))  # built once, not per call
    weights = torch.tensor(w, dtype=torch.float32, device=device)  # once per configuration, not per step
    part = torch.empty(grid[0] * part_stride, dtype=torch.float32, device=device)
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    scalars = Scalars(ignore_index=opts.ignore_index, inv_t=1.0 / t, inv_ts=1.0 / ts,
                      kd_scale=t * t if opts.t_squared else 1.0, ce_b=ce_b, log_eps=opts.log_eps)
    return Plan(opts, E, B, C, D, device, tuple(wh != 0.0 for _, _, wh in w), weights, scalars,
                1.0 / max(B * D, 1), meta, fwd_meta, grid, (_ROW_STATS * E + 2) * B + E + 1, part_stride,
                ((C,) * E, (D,) * E), part, ticket, {})


def plan_for(opts: LossOptions, logits: Sequence[Tensor], targets: Tensor, features: Sequence[Tensor],
             teacher_logits: Optional[Tensor], soft_b: Optional[Tensor]) -> Plan:
    """The cached plan of these inputs. The per-call checks are the ones a cache hit cannot vouch for (the exits
    agree with the first one); a tensor on another device fails at the launch."""
    if not logits:
        raise ValueError("logits: need at least one exit")
    z0 = logits[0]
    shape, dtype = z0.shape, z0.dtype
    if len(shape) != 2:
        raise ValueError(f"logits: each exit must be [B, C], got {tuple(shape)}")
    for i in range(1, len(logits)):
        if logits[i].shape != shape or logits[i].dtype != dtype:
            raise ValueError(f"logits[{i}]: {tuple(logits[i].shape)} {logits[i].dtype} differs from logits[0]: "
                             f"{tuple(shape)} {dtype}")
    D, f_dtype = 0, None
    if opts.hint != "none":
        if len(features) != len(logits):
            raise ValueError(f"hint={opts.hint!r} needs features: one [B, D] tensor per exit, got {len(features)} "
                             f"for {len(logits)} exits")
        f_shape, f_dtype = features[0].shape, features[0].dtype
        for i, f in enumerate(features):
            if len(f.shape) != 2 or f.shape != f_shape or f.shape[0] != shape[0] or f.dtype != f_dtype:
                raise ValueError(f"features[{i}]: every exit needs the same [B={shape[0]}, D] float shape and "
                                 f"dtype, got {tuple(f.shape)} {f.dtype}")
        D = f_shape[1]
    t_meta = (teacher_logits.shape, teacher_logits.dtype) if teacher_logits is not None else (None, None)
    b_meta = (soft_b.shape, soft_b.dtype) if soft_b is not None else (None, None)
    return _plan(opts, len(logits), shape[0], shape[1], D, dtype, f_dtype, *t_meta, *b_meta, targets.shape,
                 targets.dtype, z0.device)


# --------------------------------------------------------------------------------------------- launches


def _unit_col(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class Streams(NamedTuple):
    """The tensors and row strides a launch reads, prepared once per forward and kept for the backward."""

    zs: tuple[Tensor, ...]
    fs: tuple[Tensor, ...]
    tz: Tensor
    y: Tensor
    brow: Tensor
    teacher: Optional[Tensor]  # the tensors to save for the backward (None where the plan has none)
    soft_b: Optional[Tensor]
    strides: tuple  # (row strides of zs, of fs, of tz)
    align: int


def streams(plan: Plan, logits, targets, features, teacher_logits, soft_b) -> Streams:
    if all(z.is_contiguous() for z in logits) and all(f.is_contiguous() for f in features):
        zs, fs = tuple(logits), tuple(features)
        zst, fst = plan.row_strides
    else:
        zs = tuple(_unit_col(z) for z in logits)
        fs = tuple(_unit_col(f) for f in features)
        zst, fst = tuple(z.stride(0) for z in zs), tuple(f.stride(0) for f in fs)
    tz = _unit_col(teacher_logits) if teacher_logits is not None else None
    y = targets if targets.stride(0) == 1 else targets.contiguous()
    b = soft_b if soft_b is None or soft_b.stride(0) == 1 else soft_b.contiguous()
    t_stride = tz.stride(0) if tz is not None else 0
    v = plan.meta[1]["V"]
    align = v if plan.C % v == 0 and all(st % v == 0 for st in zst) and t_stride % v == 0 else 1
    # without a logits teacher or a closed-form target the kernels never read those pointers: any tensor will do
    return Streams(zs, fs if plan.D else zs, tz if tz is not None else zs[0], y, b if b is not None else plan.weights,
                   tz, b, (zst, fst if plan.D else zst, t_stride), align)


def forward(plan: Plan, st: Streams) -> tuple[Tensor, Tensor, Tensor]:
    """(total [], losses [E, 3], saved statistics)."""
    f32 = dict(dtype=torch.float32, device=plan.device)
    total, losses, stats = torch.empty((), **f32), torch.empty((plan.E, 3), **f32), torch.empty(plan.stats_size, **f32)
    zst, fst, t_stride = st.strides
    part, ticket = plan.scratch()
    fwd._fwd_kernel[plan.grid](
        st.zs, zst, st.fs, fst, st.tz, t_stride, st.y, st.brow, plan.weights, stats, part, ticket, total,
        losses, plan.B, plan.C, plan.D, *plan.scalars, plan.inv_bd, **plan.fwd_meta[st.align])
    return total, losses, stats


def backward(plan: Plan, grad: Tensor, stats: Tensor, st: Streams) -> tuple[Tensor, Optional[Tensor]]:
    """(d logits [E, B, C] in the logits' dtype, d features [E, B, D] in theirs; rows of unhinted exits unset)."""
    dz = torch.empty((plan.E, plan.B, plan.C), dtype=st.zs[0].dtype, device=plan.device)
    df = torch.empty((plan.E, plan.B, plan.D), dtype=st.fs[0].dtype, device=plan.device) if plan.D else dz
    zst, fst, t_stride = st.strides
    bwd._bwd_kernel[plan.grid](
        st.zs, zst, st.fs, fst, st.tz, t_stride, st.y, st.brow, plan.weights, stats, grad,
        *(grad.stride() if grad.dim() else (0, 0)), dz, df, plan.B, plan.C, plan.D, *plan.scalars,
        **plan.meta[st.align])
    return dz, (df if plan.D else None)


def upstream(g_total: Optional[Tensor], g_losses: Optional[Tensor]) -> Optional[Tensor]:
    """The fp32 upstream gradient of every term: [E, 3], or the scalar gradient of `total` alone, which the
    kernel reads with zero strides (no copy, no broadcast)."""
    if g_total is None:
        return None if g_losses is None else g_losses.float()
    return g_total.float() if g_losses is None else g_losses.float() + g_total.float()


# --------------------------------------------------------------------------------------------- eager autograd


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: Plan, targets, teacher_logits, soft_b, *tensors):
        st = streams(plan, tensors[:plan.E], targets, tensors[plan.E:], teacher_logits, soft_b)
        total, losses, stats = forward(plan, st)
        ctx.set_materialize_grads(False)  # unused outputs get no zero-filled gradients
        ctx.plan, ctx.streams = plan, (st.strides, st.align, len(st.fs) if plan.D else 0)
        ctx.save_for_backward(stats, st.y, st.teacher, st.soft_b, *st.zs, *(st.fs if plan.D else ()))
        return total, losses

    @staticmethod
    def backward(ctx, g_total, g_losses):
        plan = ctx.plan
        stats, y, teacher, soft_b, *tensors = ctx.saved_tensors
        n_feats = len(tensors) - plan.E
        g = upstream(g_total, g_losses)
        if g is None:
            return (None,) * (4 + len(tensors))
        strides, align, _ = ctx.streams
        zs, fs = tuple(tensors[:plan.E]), tuple(tensors[plan.E:])
        st = Streams(zs, fs or zs, teacher if teacher is not None else zs[0], y,
                     soft_b if soft_b is not None else plan.weights, teacher, soft_b, strides, align)
        dz, df = backward(plan, g, stats, st)
        if df is None:
            return (None, None, None, None, *dz.unbind(0), *([None] * n_feats))
        d_feats = df.unbind(0)
        return (None, None, None, None, *dz.unbind(0), *[d if h else None for d, h in zip(d_feats, plan.hinted)])


# --------------------------------------------------------------------------------------------- torch.library ops


def _plan_from(logits, targets, features, teacher_logits, soft_b, options_text: str) -> Plan:
    return plan_for(LossOptions.decode(options_text), logits, targets, features, teacher_logits, soft_b)


@torch.library.custom_op("selfdistill::multi_exit_loss", mutates_args=())
def _loss_op(logits: list[Tensor], targets: Tensor, features: list[Tensor], teacher_logits: Optional[Tensor],
             soft_b: Optional[Tensor], options: str) -> tuple[Tensor, Tensor, Tensor]:
    """(total [], losses [E, 3], saved statistics); `options` is LossOptions.encoded."""
    plan = _plan_from(logits, targets, features, teacher_logits, soft_b, options)
    return forward(plan, streams(plan, logits, targets, features, teacher_logits, soft_b))


@_loss_op.register_fake
def _loss_fake(logits, targets, features, teacher_logits, soft_b, options):
    E, B = len(logits), logits[0].shape[0]
    z = logits[0]
    f32 = dict(dtype=torch.float32)
    return z.new_empty((), **f32), z.new_empty((E, 3), **f32), z.new_empty((_ROW_STATS * E + 2) * B + E + 1, **f32)


@torch.library.custom_op("selfdistill::multi_exit_loss_backward", mutates_args=())
def _backward_op(grad: Tensor, stats: Tensor, logits: list[Tensor], targets: Tensor, features: list[Tensor],
                 teacher_logits: Optional[Tensor], soft_b: Optional[Tensor], options: str) -> tuple[Tensor, Tensor]:
    """(d logits [E, B, C], d features [E, B, D], or an empty tensor without a hint)."""
    plan = _plan_from(logits, targets, features, teacher_logits, soft_b, options)
    dz, df = backward(plan, grad, stats, streams(plan, logits, targets, features, teacher_logits, soft_b))
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
    g = upstream(g_total, g_losses).expand(ctx.num_exits, 3)
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

