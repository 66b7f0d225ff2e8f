"""The backward kernel of the fused multi-exit loss (the design: kernels/multi_exit/forward.py).

The gradient is recomputed from the logits and the per-row statistics the forward saved, so no [E, B, C] buffer is
kept between the passes; the upstream gradient is folded in before the result is rounded to the logits' dtype.
The deepest exit goes first when it is the teacher: its softmax at T is the other exits' target. The softmax at
T = 1 comes from a polynomial exp2 on the FMA pipe, since the special-function unit is spent on the softmax at T.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.multi_exit.tiles import (
    EPS_CE,
    EPS_KD,
    EPS_NONE,
    HINT_NONE,
    HINT_SSE,
    LOG2E,
    ROW_STATS,
    ST_LSE1,
    ST_LSES,
    ST_R1,
    ST_RS,
    ST_WEPS,
    TEACHER_CLOSED,
    TEACHER_DEEPEST,
    TEACHER_LOGITS,
    TEACHER_NONE,
    _closed_target,
    _labels,
    _lanes,
    _load,
    _row_off,
    _softmax_1,
    _true_tile,
)


@triton.jit
def _grad_slot(Z, stride_z, DZ, s, rows, rows_ld, row_ok, cols, mask, is_y, B, C, rstats, coefs, p, rt, b_on, b_off,
               ce_b, log_eps, inv_tq, inv_ts, TEACHER: tl.constexpr, EPS: tl.constexpr, IS_TEACHER: tl.constexpr,
               TWO: tl.constexpr, ALIGN: tl.constexpr, EXCL: tl.constexpr, MASKED: tl.constexpr):
    """Write one exit's gradient tile; return its softmax at its KD temperature (the others' teacher when
    IS_TEACHER)."""
    lse1, r1, lse_q, rq, weps = rstats
    c_ce, c_kd = coefs
    _, x = _load(Z, _row_off(rows_ld, stride_z, ALIGN) + cols, mask, MASKED)
    q = tl.exp2((x * inv_tq - lse_q[:, None, None]) * LOG2E)
    sm = _softmax_1(q, x, lse1, TWO)
    off_ce = (1.0 - ce_b) / (C - 1)
    # without EXCL the tile holds no true class: the plain off-class forms, no per-element select
    if EPS == EPS_CE:
        tgt = tl.where(is_y, ce_b, off_ce) if EXCL else off_ce
        g_ce = sm * weps[:, None, None] - tgt * sm / (sm + log_eps)
    else:
        g_ce = tl.where(is_y, (1.0 - ce_b) - r1[:, None, None], sm - off_ce) if EXCL else sm - off_ce
    g = c_ce[:, None, None] * g_ce
    if not (TEACHER == TEACHER_NONE or IS_TEACHER):
        if EPS == EPS_KD:
            tgt = p
            if TEACHER == TEACHER_CLOSED:
                tgt = tl.where(is_y, b_on, b_off) if EXCL else b_off
            g_kd = q * weps[:, None, None] - tgt * q / (q + log_eps)
        elif TEACHER == TEACHER_CLOSED:
            g_kd = tl.where(is_y, (1.0 - b_on) - rq[:, None, None], q - b_off) if EXCL else q - b_off
        elif EXCL:  # q_y - p_y as the difference of the other classes' masses
            g_kd = tl.where(is_y, (rt - rq)[:, None, None], q - p)
        else:
            g_kd = q - p
        g += (c_kd * inv_ts)[:, None, None] * g_kd
    out = DZ + (rows[:, None, None] + s * B) * C + cols
    if MASKED:
        tl.store(out, g.to(DZ.dtype.element_ty), mask=row_ok[:, None, None] & mask)
    else:
        tl.store(out, g.to(DZ.dtype.element_ty), mask=row_ok[:, None, None])
    return q


@triton.jit
def _grad_tile(ZS, SZ, DZ, TZ, stride_t, rows, rows_ld, row_ok, lanes, c0, B, C, y_cls, rs_all, c_all, lse_t, rt,
               b_row, ce_b, log_eps, inv_t, inv_ts, N: tl.constexpr, TEACHER: tl.constexpr, EPS: tl.constexpr,
               TWO_S: tl.constexpr, TWO_T: tl.constexpr, ALIGN: tl.constexpr, EXCL: tl.constexpr,
               MASKED: tl.constexpr):
    cols = c0 + lanes
    mask = cols < C
    is_y = cols == y_cls[:, None, None]
    p = tl.zeros([1, 1, 1], tl.float32)
    if TEACHER == TEACHER_LOGITS:
        _, t = _load(TZ, _row_off(rows_ld, stride_t, ALIGN) + cols, mask, MASKED)
        p = tl.exp2((t * inv_t - lse_t[:, None, None]) * LOG2E)
    b_on = tl.zeros([1, 1, 1], tl.float32)
    b_off = tl.zeros([1, 1, 1], tl.float32)
    if TEACHER == TEACHER_CLOSED:
        b_on, b_off = _closed_target(b_row[:, None, None], C)
    if TEACHER == TEACHER_DEEPEST:  # the deepest exit first: its softmax at T is the others' teacher
        p = _grad_slot(ZS[N - 1], SZ[N - 1], DZ, N - 1, rows, rows_ld, row_ok, cols, mask, is_y, B, C, rs_all[N - 1],
                       c_all[N - 1], p, rt, b_on, b_off, ce_b, log_eps, inv_t, inv_ts, TEACHER, EPS,
                       IS_TEACHER=True, TWO=TWO_T, ALIGN=ALIGN, EXCL=EXCL, MASKED=MASKED)
        for s in tl.static_range(N - 1):
            _grad_slot(ZS[s], SZ[s], DZ, s, rows, rows_ld, row_ok, cols, mask, is_y, B, C, rs_all[s], c_all[s], p,
                       rt, b_on, b_off, ce_b, log_eps, inv_ts, inv_ts, TEACHER, EPS, IS_TEACHER=False, TWO=TWO_S,
                       ALIGN=ALIGN, EXCL=EXCL, MASKED=MASKED)
    else:
        for s in tl.static_range(N):
            _grad_slot(ZS[s], SZ[s], DZ, s, rows, rows_ld, row_ok, cols, mask, is_y, B, C, rs_all[s], c_all[s], p,
                       rt, b_on, b_off, ce_b, log_eps, inv_ts, inv_ts, TEACHER, EPS, IS_TEACHER=False, TWO=TWO_S,
                       ALIGN=ALIGN, EXCL=EXCL, MASKED=MASKED)


@triton.jit
def _bwd_kernel(
    ZS, SZ,  # as in the forward
    FS, SF,
    TZ, stride_t,
    Y, BROW, W,
    STATS,  # fp32: what the forward saved
    GL, s_gl0, s_gl1,  # [N, 3] fp32 upstream gradient of the terms (may be an expanded view of one scalar)
    DZ,  # [N, B, C] out, logits dtype
    DF,  # [N, B, D] out, features dtype (only the exits with a hint are written)
    B, C, D, ignore_index, inv_t, inv_ts, kd_scale, ce_b, log_eps,
    N: tl.constexpr, TEACHER: tl.constexpr, HINT: tl.constexpr, EPS: tl.constexpr, TWO_S: tl.constexpr,
    TWO_T: tl.constexpr, BLOCK_B: tl.constexpr, NT: tl.constexpr, V: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows_ld = tl.minimum(rows, B - 1)
    valid, in_range, y_cls = _labels(Y, rows, row_ok, C, ignore_index)
    lanes = _lanes(NT, V, ALIGN)
    if ALIGN > 1:  # so the class mask is uniform over each vector
        C = tl.multiple_of(C, ALIGN)
    tail = STATS + (ROW_STATS * N + 2) * B
    n_valid = tl.load(tail + N)
    lse_t = tl.load(STATS + (ROW_STATS * N) * B + rows, mask=row_ok, other=0.0)
    rt = tl.load(STATS + (ROW_STATS * N + 1) * B + rows, mask=row_ok, other=0.0)
    b_row = tl.zeros([BLOCK_B], tl.float32)
    if TEACHER == TEACHER_CLOSED:
        b_row = tl.load(BROW + rows, mask=row_ok, other=1.0).to(tl.float32)
    rs_all = ()
    c_all = ()
    st = STATS + rows
    for s in tl.static_range(N):
        weps = tl.zeros([BLOCK_B], tl.float32)
        if EPS != EPS_NONE:
            weps = tl.load(st + (ST_WEPS * N + s) * B, mask=row_ok, other=0.0)
        rs_all = rs_all + ((tl.load(st + (ST_LSE1 * N + s) * B, mask=row_ok, other=0.0),
                            tl.load(st + (ST_R1 * N + s) * B, mask=row_ok, other=0.0),
                            tl.load(st + (ST_LSES * N + s) * B, mask=row_ok, other=0.0),
                            tl.load(st + (ST_RS * N + s) * B, mask=row_ok, other=0.0), weps),)
        w_ce = tl.load(W + 3 * s)
        w_kd = tl.load(W + 3 * s + 1)
        g_ce = tl.load(GL + s * s_gl0)
        g_kd = tl.load(GL + s * s_gl0 + s_gl1)
        # a weight of 0 drops the term even when nothing is labelled (no 0 / 0)
        c_ce = tl.where(valid & in_range, tl.where(w_ce != 0.0, g_ce * w_ce / n_valid, 0.0), 0.0)
        if TEACHER == TEACHER_CLOSED:
            c_kd = tl.where(valid & in_range, tl.where(w_kd != 0.0, g_kd * w_kd * kd_scale / n_valid, 0.0), 0.0)
        else:
            c_kd = tl.where(row_ok, g_kd * w_kd * kd_scale / B, 0.0)
        c_all = c_all + ((c_ce, c_kd),)

    BLOCK_C: tl.constexpr = NT * V  # tiles as in the forward: the true class's tile out of the loop
    c_full = (C // BLOCK_C) * BLOCK_C
    c_y = _true_tile(y_cls, BLOCK_C, BLOCK_B)
    for c0 in range(0, c_full, BLOCK_C):
        if c0 != c_y:
            _grad_tile(ZS, SZ, DZ, TZ, stride_t, rows, rows_ld, row_ok, lanes, c0, B, C, y_cls, rs_all, c_all,
                       lse_t, rt, b_row, ce_b, log_eps, inv_t, inv_ts, N, TEACHER, EPS, TWO_S, TWO_T, ALIGN,
                       EXCL=BLOCK_B > 1, MASKED=False)
    if c_full > 0 and (c_y >= 0) & (c_y < c_full):
        _grad_tile(ZS, SZ, DZ, TZ, stride_t, rows, rows_ld, row_ok, lanes, c_y, B, C, y_cls, rs_all, c_all, lse_t,
                   rt, b_row, ce_b, log_eps, inv_t, inv_ts, N, TEACHER, EPS, TWO_S, TWO_T, ALIGN, EXCL=True,
                   MASKED=False)
    if c_full < C:
        _grad_tile(ZS, SZ, DZ, TZ, stride_t, rows, rows_ld, row_ok, lanes, c_full, B, C, y_cls, rs_all, c_all,
                   lse_t, rt, b_row, ce_b, log_eps, inv_t, inv_ts, N, TEACHER, EPS, TWO_S, TWO_T, ALIGN, EXCL=True,
                   MASKED=True)

    if HINT != HINT_NONE:
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (dc < D)[None, :]
            ft = tl.load(FS[N - 1] + rows[:, None] * SF[N - 1] + dc[None, :], mask=mask, other=0.0).to(tl.float32)
            for s in tl.static_range(N - 1):
                w_h = tl.load(W + 3 * s + 2)
                if w_h != 0.0:
                    scale = tl.load(GL + s * s_gl0 + 2 * s_gl1) * tl.load(tail + s)
                    f = tl.load(FS[s] + rows[:, None] * SF[s] + dc[None, :], mask=mask, other=0.0).to(tl.float32)
                    diff = f - ft
                    if HINT == HINT_SSE:
                        diff = tl.where((f > 0.0) | (ft > 0.0), diff, 0.0)
                    tl.store(DF + (rows[:, None] + s * B) * D + dc[None, :],
                             (diff * scale).to(DF.dtype.element_ty), mask=mask)
