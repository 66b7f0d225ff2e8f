"""The tiles of the fused multi-exit loss kernels (kernels/multi_exit/forward.py, kernels/multi_exit/backward.py):
constants, loads, the per-lane online softmax and the exponentials, shared by the forward and the backward.

A tile is [BLOCK_B, NT, V]: NT lanes of V columns (one 16-byte vector each when the rows are aligned). Every lane
keeps its own running max and sums and the lanes are combined once per row, so a tile needs no cross-lane
reduction. Every load is cast to fp32 at once (the interpreter's bf16 arithmetic is wrong).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Module constants are tl.constexpr so the kernels can read them.
LOG2E = tl.constexpr(1.4426950408889634)
TEACHER_NONE, TEACHER_DEEPEST, TEACHER_LOGITS, TEACHER_CLOSED = (tl.constexpr(i) for i in range(4))
HINT_NONE, HINT_SSE, HINT_L2, HINT_MSE = (tl.constexpr(i) for i in range(4))
EPS_NONE, EPS_CE, EPS_KD = (tl.constexpr(i) for i in range(3))  # which soft-target term takes log(q + eps)
# Saved per-row statistics, STATS[(k * E + e) * B + row]: log-sum-exp and other-class mass at T = 1 and at the
# student's KD temperature, and the log_eps normaliser; then the teacher's two at T, then per-exit hint factors
# and the labelled-row count.
ROW_STATS = tl.constexpr(5)
ST_LSE1, ST_R1, ST_LSES, ST_RS, ST_WEPS = (tl.constexpr(i) for i in range(5))


@triton.jit
def _exp2_fma(x):
    # 2^x without the special-function unit (FlashAttention-4's trick): 2^(x - n) by a degree-6 polynomial on
    # [-1/2, 1/2] (max relative error 1.0e-7 in fp32, the accuracy of MUFU.EX2), times 2^n by adding n to the
    # exponent bits. n = round(x) comes from adding 1.5 * 2^23, which leaves n in the low mantissa bits. Arguments
    # are clamped at -125 (2^-125 = 2.4e-38 stands in for anything smaller, which no fp32 sum or bf16 value sees).
    xc = tl.maximum(x, -125.0)
    t = xc + 12582912.0
    f = xc - (t - 12582912.0)
    p = 0.00015353351773228496
    p = p * f + 0.0013398873852565885
    p = p * f + 0.00961843691766262
    p = p * f + 0.055503323674201965
    p = p * f + 0.24022647738456726
    p = p * f + 0.6931471824645996
    p = p * f + 1.0
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _ipow(e, P: tl.constexpr):
    r = e
    for _ in tl.static_range(P - 1):
        r = r * e
    return r


@triton.jit
def _unit_exp(e, d, POW: tl.constexpr):
    # exp(d) given e = exp(d / T): e^T for an integer T (POW), else the polynomial exp2
    if POW > 0:
        return _ipow(e, POW)
    return _exp2_fma(d * LOG2E)


@triton.jit
def _softmax_1(q, x, lse1, TWO: tl.constexpr):
    # The softmax at T = 1 of a stream whose softmax at T is q. The gradient needs it to fp32 accuracy (a power of
    # q would triple q's rounding error), and the special-function unit is spent on q: the polynomial exp2.
    if not TWO:
        return q
    return _exp2_fma(x * LOG2E - (lse1 * LOG2E)[:, None, None])


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    """(values with 0 past the last class, values with -inf there), both fp32. Row offsets come from rows clamped
    to B - 1, so a padded row re-reads the last one and only the class mask is needed."""
    if MASKED:
        xz = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return xz, tl.where(mask, xz, float("-inf"))
    xz = tl.load(ptr + offs).to(tl.float32)
    return xz, xz


@triton.jit
def _row_off(rows, stride, ALIGN: tl.constexpr):
    """[BLOCK_B, 1, 1] element offsets of the rows; ALIGN > 1 vouches that each row starts on a 16-byte vector."""
    off = rows * stride
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off[:, None, None]


@triton.jit
def _lanes(NT: tl.constexpr, V: tl.constexpr, ALIGN: tl.constexpr):
    """[1, NT, V] column offsets of a tile. Aligned rows: lane i owns the V contiguous columns of one 16-byte load.
    Otherwise lane i owns columns i, i + NT, ...: a warp still reads consecutive addresses, and every thread still
    reduces its own V columns."""
    nt = tl.arange(0, NT)[:, None]
    v = tl.arange(0, V)[None, :]
    if ALIGN > 1:
        return (nt * V + v)[None, :, :]
    return (v * NT + nt)[None, :, :]


@triton.jit
def _sweep(x, m, lo_a, lo_b, not_y, k_a, POW: tl.constexpr, TWO: tl.constexpr, EXCL: tl.constexpr):
    """One tile of one stream. m [BB, NT]: per-lane running max of the raw logits; lo_a / lo_b: per-lane sums,
    true class left out, of exp((x - m) / T_a) and (TWO) exp(x - m). Returns the new state, the lanes' rescale
    factor and e = exp((x - m_new) / T_a) with the true class in. EXCL: the tile may hold a true class."""
    m_new = tl.maximum(m, tl.max(x, 2))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    d_lane = m - m_ref
    r = tl.exp2(d_lane * k_a)
    e = tl.exp2(x * k_a - (m_ref * k_a)[:, :, None])
    e_out = tl.where(not_y, e, 0.0) if EXCL else e
    lo_a = lo_a * r + tl.sum(e_out, 2)
    if TWO:
        if POW > 0:
            e1 = _ipow(e_out, POW)
        else:
            e1 = _exp2_fma(x * LOG2E - (m_ref * LOG2E)[:, :, None])
            e1 = tl.where(not_y, e1, 0.0) if EXCL else e1
        lo_b = lo_b * _unit_exp(r, d_lane, POW) + tl.sum(e1, 2)
    return m_new, lo_a, lo_b, r, e


@triton.jit
def _row_stats(m, lo_a, lo_b, z_y, has_y, k_a, inv_ta, POW: tl.constexpr, TWO: tl.constexpr):
    """Combine the lanes of one stream: (lse at T_a, other-class mass at T_a, lse at 1, mass at 1, l at T_a, the
    lanes' scale to the row max)."""
    mx = tl.max(m, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    d = m - mx[:, None]
    s = tl.exp2(d * k_a)
    oa = tl.sum(lo_a * s, 1)
    la = oa + tl.where(has_y, tl.exp2((z_y - mx) * k_a), 0.0)
    lse_a = mx * inv_ta + tl.log(la)
    if TWO:
        ob = tl.sum(lo_b * _unit_exp(s, d, POW), 1)
        lb = ob + tl.where(has_y, tl.exp(z_y - mx), 0.0)
        return lse_a, oa / la, mx + tl.log(lb), ob / lb, la, s
    return lse_a, oa / la, lse_a, oa / la, la, s


@triton.jit
def _labels(Y, rows, row_ok, C, ignore_index):
    y = tl.load(Y + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (y != ignore_index)
    in_range = (y >= 0) & (y < C)
    # int32 (C < 2^31): the per-element compare with the column index stays a 32-bit op
    return valid, in_range, tl.where(valid & in_range, y, -1).to(tl.int32)  # -1: no column is the true class


@triton.jit
def _true_tile(y_cls, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    """With one row per program: the first column of the tile that holds its true class (-1: no true class, or
    several rows per program, whose loop keeps the per-element exclusion)."""
    if BLOCK_B > 1:
        return -1
    y = tl.sum(y_cls, 0)
    return tl.where(y >= 0, (y // BLOCK_C) * BLOCK_C, -1)


@triton.jit
def _closed_target(b_row, C):
    return b_row, (1.0 - b_row) / (C - 1)
