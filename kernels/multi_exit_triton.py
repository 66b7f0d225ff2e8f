"""Triton kernels of the fused multi-exit loss (launchers and autograd wiring: kernels/multi_exit_loss.py).

Grid of the two heavy kernels: row blocks x exit slots, flattened with the slot fastest. A program owns BLOCK_B rows
of one exit and walks the classes in BLOCK_C tiles twice: pass 1 gathers online-softmax statistics of the student
(and of the teacher, which costs no extra pass because its row is read alongside), pass 2 writes the gradient and
the elementwise KL. The teacher distribution is recomputed per program from its row instead of being shared through
memory: a [B, C] teacher buffer would cost a write and E reads, the recompute costs only ALU.

Numerics: every load is cast to fp32 at once (the interpreter's bf16 arithmetic is wrong, and we want fp32
accumulation anyway). The gradient of the true class, softmax_y - b, would cancel for a confident row, so it is
rebuilt from a running sum that leaves the true class out: 1 - softmax_y = sum_{k != y} exp(z_k - m) / sum_k ...
Columns past C read -inf and vanish from every softmax; padded rows read 0 and are masked at every store and sum.
No atomics: losses leave as per-program partials that _finalize_kernel adds in a fixed order (deterministic).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Per-row statistics saved for the backward recompute, STATS[e, k, row] with k = 0 lse (T=1), 1 true-class-free mass
# (T=1), 2 lse at the student's KD temperature, 3 its true-class-free mass, 4 teacher lse at T, 5 its mass.
N_STATS = 6
TEACHER_NONE, TEACHER_LOGITS, TEACHER_CLOSED = 0, 1, 2
HINT_NONE, HINT_SSE, HINT_L2, HINT_MSE = 0, 1, 2, 3


@triton.jit
def _pick(slot, v0, v1, v2, v3):
    # The exits' tensors arrive as separate arguments (stacking them would copy every logit): take this slot's.
    v = tl.where(slot == 1, v1, v0)
    v = tl.where(slot == 2, v2, v)
    return tl.where(slot == 3, v3, v)


@triton.jit
def _program(N_SLOTS: tl.constexpr):
    # 1-D grid, exit slot fastest: the programs that read the same teacher rows run side by side and share them
    # through L2 (a (row block, exit) grid would launch them NB programs apart). 1-D also lifts the 65535 limit.
    pid = tl.program_id(0)
    return pid // N_SLOTS, pid % N_SLOTS


@triton.jit
def _load_tile(row_ptr, cols, rows_ok, C):
    # [BLOCK_B, BLOCK_C] fp32: -inf past C so those columns drop out of every softmax, 0 on padded rows
    col_ok = cols < C
    x = tl.load(row_ptr[:, None] + cols[None, :], mask=rows_ok[:, None] & col_ok[None, :], other=0.0)
    return tl.where(col_ok[None, :], x.to(tl.float32), float("-inf"))


@triton.jit
def _online(m_old, m_new, l, lo, x, not_y, scale):
    # running sums of exp((x - m) * scale), all classes and all but the true one, moved to the new max
    e = tl.exp((x - m_new[:, None]) * scale)
    a = tl.exp((m_old - m_new) * scale)
    return l * a + tl.sum(e, 1), lo * a + tl.sum(tl.where(not_y, e, 0.0), 1)


@triton.jit
def _labels(Y, rows, rows_ok, C, ignore_index):
    y = tl.load(Y + rows, mask=rows_ok, other=ignore_index).to(tl.int64)
    valid = rows_ok & (y != ignore_index)
    in_range = (y >= 0) & (y < C)
    y_cls = tl.where(valid & in_range, y, -1)  # the column treated as the true class; -1 = none
    return valid, in_range, y_cls


@triton.jit
def _coefs(W, NVALID, e, valid, in_range, rows_ok, B, kd_scale, TEACHER: tl.constexpr):
    # per-row factors that turn the unit CE / KD gradients into those of the weighted, averaged terms
    n_valid = tl.load(NVALID)
    w_ce = tl.load(W + e * 3)
    w_kd = tl.load(W + e * 3 + 1)
    ce_unit = tl.where(w_ce != 0.0, w_ce / n_valid, 0.0)
    c_ce = tl.where(valid & in_range, ce_unit, 0.0)
    if TEACHER == 2:  # the closed-form target needs the label: mean over labelled rows
        kd_unit = tl.where(w_kd != 0.0, w_kd * kd_scale / n_valid, 0.0)
        c_kd = tl.where(valid & in_range, kd_unit, 0.0)
    else:  # a logits teacher averages over every row, like the reference kd_loss
        kd_unit = w_kd * kd_scale / B
        c_kd = tl.where(rows_ok, kd_unit, 0.0)
    return ce_unit, c_ce, kd_unit, c_kd


@triton.jit
def _row_stats(z_row, t_row, rows_ok, y_cls, C, inv_t, inv_ts,
               TEACHER: tl.constexpr, SAME_T: tl.constexpr, NEED_SUM: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 1: log-sum-exp and true-class-free mass of the student at T=1 and at its KD temperature, of the
    teacher at T, and the row sum of the logits (label smoothing / closed-form targets need it)."""
    zero = tl.zeros([BLOCK_B], tl.float32)
    m = zero + float("-inf")
    mt = zero + float("-inf")
    l, lo, ls, lso, lt, lto, sz = zero, zero, zero, zero, zero, zero, zero
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        not_y = cols[None, :] != y_cls[:, None]
        z = _load_tile(z_row, cols, rows_ok, C)
        m_new = tl.maximum(m, tl.max(z, 1))
        l, lo = _online(m, m_new, l, lo, z, not_y, 1.0)
        if TEACHER != 0:
            if not SAME_T:
                ls, lso = _online(m, m_new, ls, lso, z, not_y, inv_ts)
        if NEED_SUM:
            sz += tl.sum(tl.where(cols[None, :] < C, z, 0.0), 1)
        m = m_new
        if TEACHER == 1:
            t = _load_tile(t_row, cols, rows_ok, C)
            mt_new = tl.maximum(mt, tl.max(t, 1))
            lt, lto = _online(mt, mt_new, lt, lto, t, not_y, inv_t)
            mt = mt_new
    lse = m + tl.log(l)
    r = lo / l
    lse_s, rs, lse_t, rt = zero, zero, zero, zero
    if TEACHER != 0:
        if SAME_T:
            lse_s, rs = lse, r
        else:
            lse_s, rs = m * inv_ts + tl.log(ls), lso / ls
    if TEACHER == 1:
        lse_t, rt = mt * inv_t + tl.log(lt), lto / lt
    return lse, r, lse_s, rs, lse_t, rt, sz


@triton.jit
def _grad_tile(z, t, is_y, col_ok, lse, r, lse_s, rs, lse_t, rt, b_row, ce_b, c_ce, c_kd, C, inv_t, inv_ts,
               TEACHER: tl.constexpr, KD_KL: tl.constexpr, SAME_T: tl.constexpr):
    """Pass 2 on one [BLOCK_B, BLOCK_C] tile: c_ce * dCE/dz + c_kd * dKD/dz, and the elementwise KD of a logits
    teacher. Shared by the forward (c = the term weights) and the backward recompute (c = weights x grad_output)."""
    s = tl.exp(z - lse[:, None])
    d_ce = tl.where(is_y, (1.0 - ce_b) - r[:, None], s - (1.0 - ce_b) / (C - 1))
    g = c_ce[:, None] * d_ce
    kd_el = tl.zeros_like(z)
    if TEACHER != 0:
        if SAME_T:
            logq = z - lse[:, None]
            q = s
        else:
            logq = z * inv_ts - lse_s[:, None]
            q = tl.exp(logq)
        if TEACHER == 1:
            logp = t * inv_t - lse_t[:, None]
            p = tl.exp(logp)
            d_kd = tl.where(is_y, rt[:, None] - rs[:, None], q - p)  # q_y - p_y = (1 - p_y) - (1 - q_y)
            if KD_KL:
                kd_el = tl.where(col_ok[None, :], p * (logp - logq), 0.0)
            else:
                kd_el = tl.where(col_ok[None, :], -p * logq, 0.0)
        else:
            d_kd = tl.where(is_y, (1.0 - b_row)[:, None] - rs[:, None], q - ((1.0 - b_row) / (C - 1))[:, None])
        g += (c_kd * inv_ts)[:, None] * d_kd
    return g, kd_el


@triton.jit
def _closed_form_kd(lse_s, z_y, sz, b_row, C, inv_ts, KD_KL: tl.constexpr):
    # KD of a "b on the true class, (1-b)/(C-1) elsewhere" target, from row sums: no [B, C] target is built
    off = (1.0 - b_row) / (C - 1)
    cross = lse_s - inv_ts * (b_row * z_y + off * (sz - z_y))
    if KD_KL:
        neg_entropy = tl.where(b_row > 0.0, b_row * tl.log(b_row), 0.0)
        neg_entropy += tl.where(b_row < 1.0, (1.0 - b_row) * tl.log(off), 0.0)
        cross += neg_entropy
    return cross


@triton.jit
def _fwd_kernel(
    Z0, Z1, Z2, Z3,  # [B, C] logits of exit slots 0..3, unit column stride, any float dtype
    SZ0, SZ1, SZ2, SZ3,  # their row strides
    F0, F1, F2, F3,  # [B, D] pooled features of exit slots 0..3
    SF0, SF1, SF2, SF3,  # their row strides
    T, stride_t,  # [B, C] teacher logits (the deepest exit or an external teacher)
    FT, stride_ft,  # [B, D] teacher features (the deepest exit's)
    Y,  # [B] int labels
    BROW,  # [B] closed-form teacher: probability mass on the true class
    W,  # [E, 3] fp32 weights (ce, kd, hint) per exit
    NVALID,  # [1] fp32 count of labels != ignore_index
    G,  # [E, B, C] out, logits dtype: gradient of the weighted terms w.r.t. the logits
    FR,  # [E, B, D] fp32 out: hint gradient before its per-exit scalar factor
    STATS,  # [E, 6, B] fp32 out: per-row statistics for the backward recompute
    PART,  # [E, 3, NB] fp32 out: per-program partial losses
    exit_base, B, C, D, NB, ignore_index, inv_t, inv_ts, kd_scale, ce_b,
    TEACHER: tl.constexpr, KD_KL: tl.constexpr, SAME_T: tl.constexpr, SMOOTH: tl.constexpr, HINT: tl.constexpr,
    STORE_G: tl.constexpr, N_SLOTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid, slot = _program(N_SLOTS)
    e = (exit_base + slot).to(tl.int64)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_ok = rows < B
    z_row = _pick(slot, Z0, Z1, Z2, Z3) + rows * _pick(slot, SZ0, SZ1, SZ2, SZ3)
    t_row = T + rows * stride_t
    valid, in_range, y_cls = _labels(Y, rows, rows_ok, C, ignore_index)
    lse, r, lse_s, rs, lse_t, rt, sz = _row_stats(z_row, t_row, rows_ok, y_cls, C, inv_t, inv_ts, TEACHER, SAME_T,
                                                  SMOOTH or TEACHER == 2, BLOCK_B, BLOCK_C)
    st = STATS + e * 6 * B + rows
    tl.store(st + 0 * B, lse, mask=rows_ok)
    tl.store(st + 1 * B, r, mask=rows_ok)
    tl.store(st + 2 * B, lse_s, mask=rows_ok)
    tl.store(st + 3 * B, rs, mask=rows_ok)
    tl.store(st + 4 * B, lse_t, mask=rows_ok)
    tl.store(st + 5 * B, rt, mask=rows_ok)

    ce_unit, c_ce, kd_unit, c_kd = _coefs(W, NVALID, e, valid, in_range, rows_ok, B, kd_scale, TEACHER)
    b_row = tl.load(BROW + rows, mask=rows_ok, other=1.0).to(tl.float32) if TEACHER == 2 else lse
    z_y = tl.load(z_row + tl.where(y_cls >= 0, y_cls, 0), mask=rows_ok, other=0.0).to(tl.float32)

    kd_rows = tl.zeros([BLOCK_B], tl.float32)
    if STORE_G or TEACHER == 1:  # pass 2; without a stored gradient only a logits teacher's KL still needs it
        g_row = G + e * B * C + rows * C
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            z = _load_tile(z_row, cols, rows_ok, C)
            t = _load_tile(t_row, cols, rows_ok, C) if TEACHER == 1 else z
            g, kd_el = _grad_tile(z, t, cols[None, :] == y_cls[:, None], col_ok, lse, r, lse_s, rs, lse_t, rt,
                                  b_row, ce_b, c_ce, c_kd, C, inv_t, inv_ts, TEACHER, KD_KL, SAME_T)
            if STORE_G:
                tl.store(g_row[:, None] + cols[None, :], g.to(G.dtype.element_ty),
                         mask=rows_ok[:, None] & col_ok[None, :])
            if TEACHER == 1:
                kd_rows += tl.sum(kd_el, 1)

    # CE row: lse - sum_k target_k z_k; an out-of-range label poisons the loss (NaN) instead of reading astray
    if SMOOTH:
        ce_row = lse - ce_b * z_y - (1.0 - ce_b) / (C - 1) * (sz - z_y)
    else:
        ce_row = lse - z_y
    ce_row = tl.where(in_range, ce_row, float("nan"))
    part = PART + e * 3 * NB + pid
    tl.store(part, tl.sum(tl.where(valid, ce_row, 0.0)) * ce_unit)
    if TEACHER == 1:
        tl.store(part + NB, tl.sum(tl.where(rows_ok, kd_rows, 0.0)) * kd_unit)
    elif TEACHER == 2:
        kd_rows = _closed_form_kd(lse_s, z_y, sz, b_row, C, inv_ts, KD_KL)
        tl.store(part + NB, tl.sum(tl.where(valid & in_range, kd_rows, 0.0)) * kd_unit)
    else:
        tl.store(part + NB, 0.0)

    h_part = 0.0
    if HINT != 0:
        f_row = _pick(slot, F0, F1, F2, F3) + rows * _pick(slot, SF0, SF1, SF2, SF3)
        ft_row = FT + rows * stride_ft
        fr_row = FR + e * B * D + rows * D
        acc = tl.zeros([BLOCK_B], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + tl.arange(0, BLOCK_D)
            mask = rows_ok[:, None] & (dc < D)[None, :]
            f = tl.load(f_row[:, None] + dc[None, :], mask=mask, other=0.0).to(tl.float32)
            ft = tl.load(ft_row[:, None] + dc[None, :], mask=mask, other=0.0).to(tl.float32)
            diff = f - ft
            if HINT == 1:  # BYOT's sse counts only positions where either activation is positive
                diff = tl.where((f > 0.0) | (ft > 0.0), diff, 0.0)
            tl.store(fr_row[:, None] + dc[None, :], diff, mask=mask)
            acc += tl.sum(diff * diff, 1)
        h_part = tl.sum(acc)
    tl.store(part + 2 * NB, h_part)


@triton.jit
def _count_kernel(Y, NVALID, B, ignore_index, BLOCK: tl.constexpr):
    # the CE mean divides by the labelled rows; every program of the main kernel needs that count up front
    acc = tl.zeros([BLOCK], tl.int32)
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        y = tl.load(Y + i, mask=i < B, other=ignore_index)
        acc += (y != ignore_index).to(tl.int32)
    tl.store(NVALID, tl.sum(acc).to(tl.float32))


@triton.jit
def _finalize_kernel(
    PART,  # [E, 3, NB] fp32 per-program partial losses
    W,  # [E, 3] fp32 weights
    LOSS,  # [E, 3] fp32 out: (ce, kd, hint) per exit
    FSCALE,  # [E] fp32 out: d hint / d features = FSCALE * FR
    NB, inv_bd,
    HINT: tl.constexpr, BLOCK: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    base = PART + e * 3 * NB
    a0 = tl.zeros([BLOCK], tl.float32)
    a1 = tl.zeros([BLOCK], tl.float32)
    a2 = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, NB, BLOCK):  # fixed order: the same inputs give bitwise the same losses
        i = i0 + tl.arange(0, BLOCK)
        a0 += tl.load(base + i, mask=i < NB, other=0.0)
        a1 += tl.load(base + NB + i, mask=i < NB, other=0.0)
        a2 += tl.load(base + 2 * NB + i, mask=i < NB, other=0.0)
    h = tl.sum(a2)
    w_h = tl.load(W + e * 3 + 2)
    if HINT == 2:  # torch.dist: an un-squared norm over the whole batch, so the gradient needs the global norm
        norm = tl.sqrt(h)
        loss_h = w_h * norm
        fscale = tl.where(norm > 0.0, w_h / norm, 0.0)
    elif HINT == 3:
        loss_h = w_h * h * inv_bd
        fscale = 2.0 * w_h * inv_bd
    else:
        loss_h = w_h * h
        fscale = 2.0 * w_h
    tl.store(LOSS + e * 3, tl.sum(a0))
    tl.store(LOSS + e * 3 + 1, tl.sum(a1))
    tl.store(LOSS + e * 3 + 2, loss_h)
    tl.store(FSCALE + e, fscale)


@triton.jit
def _recompute_rows(Z, SZ, T, stride_t, Y, BROW, W, NVALID, STATS, out_row, e, rows, rows_ok, g_ce, g_kd,
                    B, C, ignore_index, inv_t, inv_ts, kd_scale, ce_b,
                    TEACHER: tl.constexpr, SAME_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # the logits gradient from the logits and the saved row statistics, each term with its own upstream gradient
    z_row = Z + rows * SZ
    t_row = T + rows * stride_t
    valid, in_range, y_cls = _labels(Y, rows, rows_ok, C, ignore_index)
    ce_unit, c_ce, kd_unit, c_kd = _coefs(W, NVALID, e, valid, in_range, rows_ok, B, kd_scale, TEACHER)
    st = STATS + e * 6 * B + rows
    lse = tl.load(st + 0 * B, mask=rows_ok, other=0.0)
    r = tl.load(st + 1 * B, mask=rows_ok, other=0.0)
    lse_s = tl.load(st + 2 * B, mask=rows_ok, other=0.0)
    rs = tl.load(st + 3 * B, mask=rows_ok, other=0.0)
    lse_t = tl.load(st + 4 * B, mask=rows_ok, other=0.0)
    rt = tl.load(st + 5 * B, mask=rows_ok, other=0.0)
    b_row = tl.load(BROW + rows, mask=rows_ok, other=1.0).to(tl.float32) if TEACHER == 2 else lse
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        z = _load_tile(z_row, cols, rows_ok, C)
        t = _load_tile(t_row, cols, rows_ok, C) if TEACHER == 1 else z
        g, kd_el = _grad_tile(z, t, cols[None, :] == y_cls[:, None], col_ok, lse, r, lse_s, rs, lse_t, rt,
                              b_row, ce_b, c_ce * g_ce, c_kd * g_kd, C, inv_t, inv_ts, TEACHER, True, SAME_T)
        tl.store(out_row[:, None] + cols[None, :], g.to(out_row.dtype.element_ty),
                 mask=rows_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_kernel(
    Z0, Z1, Z2, Z3,  # [B, C] logits of exit slots 0..3 (read only when recomputing)
    SZ0, SZ1, SZ2, SZ3,
    T, stride_t,  # [B, C] teacher logits
    Y,  # [B] int labels
    BROW,  # [B] closed-form teacher mass on the true class
    W,  # [E, 3] fp32 weights
    NVALID,  # [1] fp32 labelled rows
    GL, s_gl0, s_gl1,  # [E, 3] fp32 upstream gradient of the losses (may be an expanded view)
    G,  # [E, B, C] saved gradient of the weighted terms, logits dtype (unused when RECOMPUTE)
    FR,  # [E, B, D] fp32 saved raw hint gradient
    FSCALE,  # [E] fp32 hint gradient factor
    STATS,  # [E, 6, B] fp32 saved per-row statistics
    OUT,  # [E, B, C] out, logits dtype
    OUTF,  # [E, B, D] out, features dtype
    exit_base, B, C, D, ignore_index, inv_t, inv_ts, kd_scale, ce_b,
    TEACHER: tl.constexpr, SAME_T: tl.constexpr, HINT: tl.constexpr, RECOMPUTE: tl.constexpr,
    N_SLOTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scale the saved gradient by grad_output, read here on the device. The gradient is recomputed from the logits
    and the saved row statistics instead when the forward saved none (RECOMPUTE), or when the CE and KD terms of
    one exit receive different upstream gradients (never under a plain sum of the terms: one buffer holds their
    sum)."""
    pid, slot = _program(N_SLOTS)
    e = (exit_base + slot).to(tl.int64)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_ok = rows < B
    g_ce = tl.load(GL + e * s_gl0)
    g_kd = tl.load(GL + e * s_gl0 + s_gl1)
    g_h = tl.load(GL + e * s_gl0 + 2 * s_gl1)
    out_row = OUT + e * B * C + rows * C
    Z = _pick(slot, Z0, Z1, Z2, Z3)
    SZ = _pick(slot, SZ0, SZ1, SZ2, SZ3)
    if RECOMPUTE:
        _recompute_rows(Z, SZ, T, stride_t, Y, BROW, W, NVALID, STATS, out_row, e, rows, rows_ok, g_ce, g_kd,
                        B, C, ignore_index, inv_t, inv_ts, kd_scale, ce_b, TEACHER, SAME_T, BLOCK_C)
    else:
        w_ce = tl.load(W + e * 3)
        w_kd = tl.load(W + e * 3 + 1)
        if (g_ce == g_kd) | (w_kd == 0.0) | (w_ce == 0.0):
            scale = tl.where(w_ce == 0.0, g_kd, g_ce)
            g_row = G + e * B * C + rows * C
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = rows_ok[:, None] & (cols < C)[None, :]
                g = tl.load(g_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) * scale
                tl.store(out_row[:, None] + cols[None, :], g.to(OUT.dtype.element_ty), mask=mask)
        else:
            _recompute_rows(Z, SZ, T, stride_t, Y, BROW, W, NVALID, STATS, out_row, e, rows, rows_ok, g_ce, g_kd,
                            B, C, ignore_index, inv_t, inv_ts, kd_scale, ce_b, TEACHER, SAME_T, BLOCK_C)
    if HINT != 0:
        fs = g_h * tl.load(FSCALE + e)
        fr_row = FR + e * B * D + rows * D
        of_row = OUTF + e * B * D + rows * D
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + tl.arange(0, BLOCK_D)
            mask = rows_ok[:, None] & (dc < D)[None, :]
            f = tl.load(fr_row[:, None] + dc[None, :], mask=mask, other=0.0) * fs
            tl.store(of_row[:, None] + dc[None, :], f.to(OUTF.dtype.element_ty), mask=mask)
