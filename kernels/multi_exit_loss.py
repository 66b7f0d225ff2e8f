"""Fused multi-exit self-distillation loss: every term of every exit and its gradients from one forward kernel.

For E exits with logits z_e [B, C] (shallow -> deep), labels y [B] and optional pooled features f_e [B, D]:

    loss[e, 0] = ce_weight[e]   * mean_{y_i != ignore} CE(z_e,i, target_b(y_i))          b = 1 - eps (smoothing)
    loss[e, 1] = kd_weight[e]   * (T^2 if t_squared) * mean_i KD(p_i || softmax(z_e,i / Ts))   Ts = T or 1
    loss[e, 2] = hint_weight[e] * hint(f_e, f_{E-1}.detach())       sse | l2 (torch.dist) | mse

`target_b(y)` puts b on y and (1-b)/(C-1) on every other class; it is never built as a [B, C] tensor. The teacher
distribution p is one of:
    "deepest"      softmax(z_{E-1} / T), detached (BYOT); the deepest exit gets no KD term
    "logits"       softmax(teacher_logits / T), detached: external teacher [B, C] (classic KD, generations, CS-KD)
    "closed_form"  target_{soft_b[i]}(y_i) with a per-row b [B] (Beta smoothing); mean over labelled rows only
    "none"         CE (and hints) only
KD is "kl" (KL(p || q)) or "soft_ce" (-sum p log q, KL plus the teacher entropy; same gradient).
Label smoothing: convention "wrong_classes" gives eps/(C-1) to each wrong class (b = 1 - eps);
"all_classes" gives eps/C to every class like F.cross_entropy(label_smoothing=eps) (b = 1 - eps + eps/C).

Public API (see each docstring):
    multi_exit_loss(logits, targets, *, features=None, teacher="deepest", teacher_logits=None, soft_b=None,
                    ce_weight=1.0, kd_weight=0.0, hint_weight=0.0, temperature=1.0, kd="kl", t_squared=False,
                    scale_student=True, label_smoothing=0.0, smoothing_convention="wrong_classes", hint="none",
                    ignore_index=-100, block_c=0, recompute_grad=False)
        -> Tensor [E, 3] fp32: (ce, kd, hint) per exit, already weighted
    MultiExitLoss(**same options)(logits, targets, features=None, teacher_logits=None, soft_b=None) -> [E, 3]
    resolve_weights(num_exits, teacher, hint, ce_weight, kd_weight, hint_weight) -> list[float] (E*3)
    ce_true_mass(label_smoothing, convention, num_classes) -> float (b of the CE target)

Launches: forward = count labelled rows + one kernel per 4 exits (each row swept twice: softmax statistics, then
losses and gradients) + a fixed-order reduction of the losses; backward = one kernel per 4 exits.

Inputs: `logits` is a list of E tensors [B, C] (or one [E, B, C] tensor, unbound into views): the kernel takes up to
4 exits per launch as separate pointers, so they are never stacked (a stack copies every logit). Rows may be
strided; a strided class dimension is made contiguous first. Logits fp32/bf16/fp16 (one dtype for all exits), teacher
logits and features any of those; labels any integer dtype. Losses are fp32, gradients come back in the input dtype.

Autograd: the forward kernel writes the gradient of sum(loss) w.r.t. the logits (input dtype) and the hint gradient
(fp32, before a per-exit factor); backward scales them by grad_output read on the device (no host sync). If the CE
and KD terms of one exit get different upstream gradients, that exit's gradient is recomputed from the logits and the
saved row statistics instead (exact for any grad_output). Teacher logits, soft_b and the deepest exit's features get
no gradient (detached, as in the reference). No double backward.
Extra memory: one gradient buffer [E, B, C] from forward to backward; during backward the scaled copy is a second
one (out of place, so retain_graph stays correct; scaling in place breaks AOTAutograd, which cannot partition a
backward that mutates a saved forward output). recompute_grad=True saves no gradient at all: the backward rebuilds it
from the logits and the row statistics (the same code path as for unequal upstream gradients).

Devices: CUDA, or CPU under the Triton interpreter (TRITON_INTERPRET=1 set before importing triton; slow, for tests).
Out-of-range labels (not ignore_index, not in [0, C)) make the CE loss NaN instead of a device assert.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import triton
from torch import Tensor, nn

from kernels import multi_exit_triton as K

TEACHERS = ("none", "deepest", "logits", "closed_form")
KD_KINDS = ("kl", "soft_ce")
HINTS = ("none", "sse", "l2", "mse")
SMOOTHING_CONVENTIONS = ("wrong_classes", "all_classes")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SLOTS = 4  # exits per launch (the engine has at most 4); more exits take more launches
_TEACHER_CODE = {"none": K.TEACHER_NONE, "deepest": K.TEACHER_LOGITS, "logits": K.TEACHER_LOGITS,
                 "closed_form": K.TEACHER_CLOSED}
_HINT_CODE = {"none": K.HINT_NONE, "sse": K.HINT_SSE, "l2": K.HINT_L2, "mse": K.HINT_MSE}


# --------------------------------------------------------------------------------------------- option handling


def _per_exit(name: str, w: float | Sequence[float], n: int) -> list[float]:
    if isinstance(w, (int, float)):
        return [float(w)] * n
    w = [float(v) for v in w]
    if len(w) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(w)}")
    return w


def _shallow_only(name: str, w: float | Sequence[float], num_exits: int) -> list[float]:
    """Weights of terms whose teacher is the deepest exit: a scalar or E-1 values; E values must end with 0."""
    if not isinstance(w, (int, float)) and len(w) == num_exits:
        if float(w[-1]) != 0.0:
            raise ValueError(f"{name}: the deepest exit is the teacher of this term, its weight must be 0, got {w[-1]}")
        return [float(v) for v in w]
    return _per_exit(name, w, num_exits - 1) + [0.0]


def resolve_weights(num_exits: int, teacher: str, hint: str, ce_weight: float | Sequence[float] = 1.0,
                    kd_weight: float | Sequence[float] = 0.0,
                    hint_weight: float | Sequence[float] = 0.0) -> list[float]:
    """Flat [E*3] list (ce, kd, hint per exit). Scalars broadcast to every exit that can have the term."""
    ce = _per_exit("ce_weight", ce_weight, num_exits)
    if teacher == "none":
        if any(_per_exit("kd_weight", kd_weight, num_exits)):
            raise ValueError("kd_weight: teacher='none' has no KD term, the weight must be 0")
        kd = [0.0] * num_exits
    elif teacher == "deepest":
        kd = _shallow_only("kd_weight", kd_weight, num_exits)
    else:
        kd = _per_exit("kd_weight", kd_weight, num_exits)
    hw = [0.0] * num_exits if hint == "none" else _shallow_only("hint_weight", hint_weight, num_exits)
    return [v for triple in zip(ce, kd, hw) for v in triple]


def ce_true_mass(label_smoothing: float, convention: str, num_classes: int) -> float:
    """b of the CE target (b on the label, (1-b)/(C-1) elsewhere) for label smoothing eps in either convention."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: {label_smoothing} must be in [0, 1]")
    if convention not in SMOOTHING_CONVENTIONS:
        raise ValueError(f"smoothing_convention: {convention!r}; allowed: {', '.join(SMOOTHING_CONVENTIONS)}")
    if convention == "all_classes":
        return 1.0 - label_smoothing + label_smoothing / num_classes
    return 1.0 - label_smoothing


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; allowed values: {', '.join(allowed)}")
    return value


def _as_list(x: Sequence[Tensor] | Tensor | None) -> list[Tensor]:
    if x is None:
        return []
    if isinstance(x, Tensor):
        if x.dim() != 3:
            raise ValueError(f"expected a list of [B, N] tensors or one [E, B, N] tensor, got shape {tuple(x.shape)}")
        return list(x.unbind(0))
    return list(x)


def _check_inputs(logits: list[Tensor], targets: Tensor, features: list[Tensor], teacher: str,
                  teacher_logits: Optional[Tensor], soft_b: Optional[Tensor]) -> None:
    """Shape, dtype and device errors that name the argument, before anything is launched."""
    if not logits:
        raise ValueError("logits: need at least one exit")
    z0 = logits[0]
    if z0.dim() != 2 or z0.shape[1] < 2:
        raise ValueError(f"logits: each exit must be [B, C] with C >= 2, got {tuple(z0.shape)}")
    for i, z in enumerate(logits):
        if z.shape != z0.shape or z.dtype != z0.dtype or z.device != z0.device:
            raise ValueError(f"logits[{i}]: {tuple(z.shape)} {z.dtype} {z.device} differs from logits[0]: "
                             f"{tuple(z0.shape)} {z0.dtype} {z0.device}")
    if z0.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: dtype {z0.dtype} is not supported; use float32, bfloat16 or float16")
    B, C = z0.shape
    if targets.shape != (B,) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected integer labels of shape ({B},), got {tuple(targets.shape)} "
                         f"{targets.dtype}")
    _check_device(z0.device)
    others = [("targets", targets)]
    if teacher == "deepest" and len(logits) < 2:
        raise ValueError("teacher='deepest' needs at least two exits (the deepest one is the teacher)")
    if teacher == "logits":
        t = teacher_logits
        if t is None or t.shape != (B, C) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"teacher_logits: teacher='logits' needs a float [{B}, {C}] tensor, got "
                             f"{None if t is None else (tuple(t.shape), t.dtype)}")
        others.append(("teacher_logits", teacher_logits))
    if teacher == "closed_form":
        if soft_b is None or soft_b.shape != (B,) or not soft_b.dtype.is_floating_point:
            raise ValueError(f"soft_b: teacher='closed_form' needs a float [{B}] tensor of true-class masses")
        others.append(("soft_b", soft_b))
    for i, f in enumerate(features):
        if f.dim() != 2 or f.shape != features[0].shape or f.shape[0] != B or f.dtype != features[0].dtype:
            raise ValueError(f"features[{i}]: every exit needs the same [B={B}, D] float shape and dtype, got "
                             f"{tuple(f.shape)} {f.dtype}")
        if f.dtype not in FLOAT_DTYPES:
            raise TypeError(f"features: dtype {f.dtype} is not supported")
        others.append((f"features[{i}]", f))
    if features and len(features) != len(logits):
        raise ValueError(f"features: {len(features)} tensors for {len(logits)} exits")
    for name, t in others:
        if t.device != z0.device:
            raise ValueError(f"{name}: on {t.device}, the logits are on {z0.device}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    if device.type == "cpu":
        raise RuntimeError("multi_exit_loss: the Triton kernel needs a CUDA device; on CPU it only runs under the "
                           "Triton interpreter (set TRITON_INTERPRET=1 before importing triton; slow, for tests). "
                           "Use objective.backend=torch on CPU.")
    raise RuntimeError(f"multi_exit_loss: device {device} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)")


# --------------------------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=64)
def _weights_on(weights: tuple[float, ...], device: torch.device) -> Tensor:
    # one host-to-device copy per distinct weight set, not one per step
    return torch.tensor(weights, dtype=torch.float32, device=device).view(-1, 3)


def _blocks(B: int, C: int, D: int, block_c: int) -> tuple[int, int, int, int]:
    """BLOCK_B, BLOCK_C, BLOCK_D, num_warps.

    GPU: tiles of 2048 elements over 8 warps (4096 over 16 for long rows) compile for sm_90 without spills
    (`python -m kernels.aot_check` reports registers; 4096 over 8 warps spilled). The interpreter prefers few
    programs with large blocks: its cost is per op, not per element."""
    if _interpreting():
        row_tile, tile = 1 << 16, 1 << 16
    else:
        row_tile, tile = 4096, 2048
    bc = block_c if block_c > 0 else min(triton.next_power_of_2(C), row_tile)
    bb = max(1, min(tile // bc, triton.next_power_of_2(B)))
    bd = max(1, min(triton.next_power_of_2(max(D, 1)), tile // bb))
    num_warps = 16 if bb * bc >= 4096 else 8
    return bb, bc, bd, num_warps


def _unit_col(z: Tensor) -> Tensor:
    return z if z.stride(-1) == 1 else z.contiguous()


def _teacher_rows(logits: list[Tensor], teacher: str, teacher_logits: Optional[Tensor]) -> Tensor:
    # without a logits teacher the kernel never reads this pointer; any tensor of the right dtype will do
    if teacher == "deepest":
        return logits[-1]
    return _unit_col(teacher_logits) if teacher_logits is not None else logits[0]


def _slots(ts: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    ts = ts + [ts[0]] * (SLOTS - len(ts))
    return ts, [t.stride(0) for t in ts]


def _scalars(temperature: float, scale_student: bool, t_squared: bool) -> tuple[float, float, float]:
    inv_t = 1.0 / temperature
    return inv_t, inv_t if scale_student else 1.0, temperature**2 if t_squared else 1.0


def _forward(logits: list[Tensor], labels: Tensor, features: list[Tensor], teacher_logits: Optional[Tensor],
             soft_b: Optional[Tensor], weights: list[float], teacher: str, temperature: float, kd: str,
             t_squared: bool, scale_student: bool, ce_target: float, hint: str, ignore_index: int,
             block_c: int, recompute_grad: bool) -> tuple[Tensor, ...]:
    E = len(logits)
    B, C = logits[0].shape
    dev = logits[0].device
    D = features[0].shape[1] if features else 0
    logits = [_unit_col(z) for z in logits]
    features = [_unit_col(f) for f in features]
    labels = labels.contiguous()
    tmode, hmode = _TEACHER_CODE[teacher], _HINT_CODE[hint]
    tz = _teacher_rows(logits, teacher, teacher_logits)
    bb, bc, bd, warps = _blocks(B, C, D, block_c)
    nb = triton.cdiv(B, bb)
    f32 = dict(dtype=torch.float32, device=dev)
    W = _weights_on(tuple(weights), dev)
    n_valid = torch.empty(1, **f32)
    G = torch.empty(0 if recompute_grad else (E, B, C), dtype=logits[0].dtype, device=dev)
    FR = torch.empty((E, B, D), **f32) if features else torch.empty(0, **f32)
    stats = torch.empty((E, K.N_STATS, B), **f32)
    part = torch.empty((E, 3, nb), **f32)
    losses = torch.empty((E, 3), **f32)
    fscale = torch.empty(E, **f32)
    brow = soft_b.contiguous() if soft_b is not None else n_valid  # [B] vectors are read with unit stride
    inv_t, inv_ts, kd_scale = _scalars(temperature, scale_student, t_squared)
    K._count_kernel[(1,)](labels, n_valid, B, ignore_index, BLOCK=min(triton.next_power_of_2(B), 4096))
    feats = features if features else [n_valid]
    ft = features[-1] if features else n_valid
    for base in range(0, E, SLOTS):
        zs, szs = _slots(logits[base:base + SLOTS])
        fs, sfs = _slots(feats[base:base + SLOTS] if features else feats)
        n = min(SLOTS, E - base)
        K._fwd_kernel[(nb * n,)](
            *zs, *szs, *fs, *sfs, tz, tz.stride(0), ft, ft.stride(0) if features else 0, labels, brow, W, n_valid,
            G, FR, stats, part, base, B, C, D, nb, ignore_index, inv_t, inv_ts, kd_scale, ce_target,
            TEACHER=tmode, KD_KL=kd == "kl", SAME_T=inv_ts == 1.0, SMOOTH=ce_target != 1.0, HINT=hmode,
            STORE_G=not recompute_grad, N_SLOTS=n, BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps)
    K._finalize_kernel[(E,)](part, W, losses, fscale, nb, 1.0 / max(B * D, 1), HINT=hmode,
                             BLOCK=min(triton.next_power_of_2(nb), 1024))
    return losses, G, FR, fscale, stats, n_valid


def _backward(grad_losses: Tensor, G: Tensor, FR: Tensor, fscale: Tensor, stats: Tensor, n_valid: Tensor,
              logits: list[Tensor], labels: Tensor, features: list[Tensor], teacher_logits: Optional[Tensor],
              soft_b: Optional[Tensor], weights: list[float], teacher: str, temperature: float, kd: str,
              t_squared: bool, scale_student: bool, ce_target: float, hint: str, ignore_index: int,
              block_c: int, recompute_grad: bool) -> tuple[Tensor, Tensor]:
    E, (B, C) = len(logits), logits[0].shape
    dev = logits[0].device
    D = features[0].shape[1] if features else 0
    logits = [_unit_col(z) for z in logits]
    labels = labels.contiguous()
    tz = _teacher_rows(logits, teacher, teacher_logits)
    bb, bc, bd, warps = _blocks(B, C, D, block_c)
    nb = triton.cdiv(B, bb)
    W = _weights_on(tuple(weights), dev)
    out = torch.empty((E, B, C), dtype=logits[0].dtype, device=dev)
    outf = torch.empty((E, B, D), dtype=features[0].dtype, device=dev) if features else torch.empty(0, device=dev)
    brow = soft_b.contiguous() if soft_b is not None else n_valid  # [B] vectors are read with unit stride
    inv_t, inv_ts, kd_scale = _scalars(temperature, scale_student, t_squared)
    gl = grad_losses.to(torch.float32)
    for base in range(0, E, SLOTS):
        zs, szs = _slots(logits[base:base + SLOTS])
        n = min(SLOTS, E - base)
        K._bwd_kernel[(nb * n,)](
            *zs, *szs, tz, tz.stride(0), labels, brow, W, n_valid, gl, gl.stride(0), gl.stride(1), G, FR, fscale,
            stats, out, outf if features else FR, base, B, C, D, ignore_index, inv_t, inv_ts, kd_scale, ce_target,
            TEACHER=_TEACHER_CODE[teacher], SAME_T=inv_ts == 1.0, HINT=_HINT_CODE[hint], RECOMPUTE=recompute_grad,
            N_SLOTS=n, BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps)
    return out, outf


# --------------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("selfdistill::multi_exit_loss", mutates_args=())
def _loss_op(logits: list[Tensor], labels: Tensor, features: list[Tensor], teacher_logits: Optional[Tensor],
             soft_b: Optional[Tensor], weights: list[float], teacher: str, temperature: float, kd: str,
             t_squared: bool, scale_student: bool, ce_target: float, hint: str, ignore_index: int,
             block_c: int, recompute_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(losses [E, 3] fp32, grad buffer [E, B, C] (empty when recompute_grad), raw hint grad [E, B, D] fp32, hint
    factor [E], row stats [E, 6, B], labelled-row count [1]); only `losses` is differentiable."""
    return _forward(logits, labels, features, teacher_logits, soft_b, weights, teacher, temperature, kd, t_squared,
                    scale_student, ce_target, hint, ignore_index, block_c, recompute_grad)


@_loss_op.register_fake
def _loss_fake(logits, labels, features, teacher_logits, soft_b, weights, teacher, temperature, kd, t_squared,
               scale_student, ce_target, hint, ignore_index, block_c, recompute_grad):
    z = logits[0]
    E, (B, C) = len(logits), z.shape
    f32 = dict(dtype=torch.float32)
    raw = z.new_empty((E, B, features[0].shape[1]), **f32) if features else z.new_empty(0, **f32)
    return (z.new_empty((E, 3), **f32), z.new_empty(0 if recompute_grad else (E, B, C)), raw, z.new_empty(E, **f32),
            z.new_empty((E, K.N_STATS, B), **f32), z.new_empty(1, **f32))


@torch.library.custom_op("selfdistill::multi_exit_loss_backward", mutates_args=())
def _backward_op(grad_losses: Tensor, grad_buffer: Tensor, feat_raw: Tensor, feat_scale: Tensor, stats: Tensor,
                 n_valid: Tensor, logits: list[Tensor], labels: Tensor, features: list[Tensor],
                 teacher_logits: Optional[Tensor], soft_b: Optional[Tensor], weights: list[float], teacher: str,
                 temperature: float, kd: str, t_squared: bool, scale_student: bool, ce_target: float, hint: str,
                 ignore_index: int, block_c: int, recompute_grad: bool) -> tuple[Tensor, Tensor]:
    """(d logits [E, B, C] in the logits dtype, d features [E, B, D] in the features dtype)."""
    return _backward(grad_losses, grad_buffer, feat_raw, feat_scale, stats, n_valid, logits, labels, features,
                     teacher_logits, soft_b, weights, teacher, temperature, kd, t_squared, scale_student, ce_target,
                     hint, ignore_index, block_c, recompute_grad)


@_backward_op.register_fake
def _backward_fake(grad_losses, grad_buffer, feat_raw, feat_scale, stats, n_valid, logits, labels, features, *args):
    z = logits[0]
    E, (B, C) = len(logits), z.shape
    d_feats = features[0].new_empty((E, B, features[0].shape[1])) if features else z.new_empty(0, dtype=torch.float32)
    return z.new_empty((E, B, C)), d_feats


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, features, teacher_logits, soft_b, weights, *options = inputs
    losses, G, FR, fscale, stats, n_valid = output
    ctx.mark_non_differentiable(G, FR, fscale, stats, n_valid)
    ctx.num_exits, ctx.weights, ctx.options = len(logits), weights, options
    ctx.save_for_backward(G, FR, fscale, stats, n_valid, labels, teacher_logits, soft_b, *logits, *features)


def _backward_formula(ctx, grad_losses, *unused):
    G, FR, fscale, stats, n_valid, labels, teacher_logits, soft_b, *rest = ctx.saved_tensors
    logits, features = rest[:ctx.num_exits], rest[ctx.num_exits:]
    d_logits, d_feats = torch.ops.selfdistill.multi_exit_loss_backward(
        grad_losses, G, FR, fscale, stats, n_valid, logits, labels, features, teacher_logits, soft_b, ctx.weights,
        *ctx.options)
    # exits without a hint (the deepest one is the hint teacher) get None: nothing flows into their features here
    grad_feats = [d_feats[e] if ctx.weights[3 * e + 2] != 0.0 else None for e in range(len(features))]
    return list(d_logits.unbind(0)), None, grad_feats, None, None, None, *([None] * len(ctx.options))


torch.library.register_autograd("selfdistill::multi_exit_loss", _backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public API


def multi_exit_loss(logits: Sequence[Tensor] | Tensor, targets: Tensor, *,
                    features: Sequence[Tensor] | Tensor | None = None, teacher: str = "deepest",
                    teacher_logits: Optional[Tensor] = None, soft_b: Optional[Tensor] = None,
                    ce_weight: float | Sequence[float] = 1.0, kd_weight: float | Sequence[float] = 0.0,
                    hint_weight: float | Sequence[float] = 0.0, temperature: float = 1.0, kd: str = "kl",
                    t_squared: bool = False, scale_student: bool = True, label_smoothing: float = 0.0,
                    smoothing_convention: str = "wrong_classes", hint: str = "none", ignore_index: int = -100,
                    block_c: int = 0, recompute_grad: bool = False) -> Tensor:
    """[E, 3] fp32 losses (ce, kd, hint) per exit, already weighted; see the module docstring for the terms.

    Weights: a scalar broadcasts to every exit that can have the term (KD and hints of the deepest exit are 0 when
    it is their teacher); a sequence gives one value per exit (E, or E-1 for deepest-teacher terms).
    block_c: class tile override (0 = automatic), for tests of the multi-tile path.
    recompute_grad: False (default) = the forward writes the logits gradient and the backward scales it;
        True = the forward keeps per-row statistics only and the backward recomputes the gradient from the
        logits: one gradient buffer less (peak extra memory = the gradient itself) and less DRAM traffic
        (the backward reads the logits once instead of reading and writing a saved gradient), same values.
    """
    _choice("teacher", teacher, TEACHERS)
    _choice("kd", kd, KD_KINDS)
    _choice("hint", hint, HINTS)
    if not temperature > 0:
        raise ValueError(f"temperature: {temperature} must be > 0")
    logits = _as_list(logits)
    feats = _as_list(features) if hint != "none" else []
    if hint != "none" and not feats:
        raise ValueError(f"hint={hint!r} needs features (one [B, D] tensor per exit)")
    _check_inputs(logits, targets, feats, teacher, teacher_logits, soft_b)
    weights = resolve_weights(len(logits), teacher, hint, ce_weight, kd_weight, hint_weight)
    b_ce = ce_true_mass(label_smoothing, smoothing_convention, logits[0].shape[1])
    out = torch.ops.selfdistill.multi_exit_loss(
        logits, targets, feats, teacher_logits if teacher == "logits" else None,
        soft_b if teacher == "closed_form" else None, weights, teacher, float(temperature), kd, bool(t_squared),
        bool(scale_student), b_ce, hint, int(ignore_index), int(block_c), bool(recompute_grad))
    return out[0]


class MultiExitLoss(nn.Module):
    """nn.Module form of `multi_exit_loss`: the options are fixed at construction, tensors come per call."""

    def __init__(self, **options):
        super().__init__()
        allowed = {"teacher", "ce_weight", "kd_weight", "hint_weight", "temperature", "kd", "t_squared",
                   "scale_student", "label_smoothing", "smoothing_convention", "hint", "ignore_index", "block_c",
                   "recompute_grad"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"MultiExitLoss: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        self.options = options

    def forward(self, logits: Sequence[Tensor] | Tensor, targets: Tensor, features=None, teacher_logits=None,
                soft_b=None) -> Tensor:
        return multi_exit_loss(logits, targets, features=features, teacher_logits=teacher_logits, soft_b=soft_b,
                               **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
