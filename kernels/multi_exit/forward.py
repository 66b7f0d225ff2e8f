"""The forward kernel of the fused multi-exit loss (backward: kernels/multi_exit/backward.py; tiles and constants:
kernels/multi_exit/tiles.py; launcher, autograd and torch.library: kernels/multi_exit/op.py).

One program owns BLOCK_B rows and every exit of them, so the teacher's exponentials and statistics are computed once
per element and shared by all the exits it teaches. The grid is one-dimensional over row blocks.

Forward: one sweep over the classes. A tile is [BLOCK_B, NT, V]: NT lanes of V contiguous columns (one 16-byte
vector each). Every lane keeps its own running max and sums (per-lane accumulators) and the lanes are combined once
per row after the sweep, so the inner loop has no cross-lane reduction. Losses need no second pass: the KD sum
sum_k p_k (t_k/T - z_k/Ts) is accumulated against the teacher's running exponentials and rescaled like them.
Only log_eps (log(q + eps), the Beta-smoothing code's form) needs a second sweep, since log(q + eps) is not a
function of running sums. Per-program partial losses go to a scratch buffer; the last program to take a ticket
(an atomic counter) adds them in a fixed order, so the result is deterministic, and resets the ticket to 0.
Why the last program sees every partial sum (the ticket pattern on a GPU):
1. Each program stores its partials with plain `tl.store`s, possibly from several of its threads, then runs
   `tl.debug_barrier()`, which lowers to the CTA barrier `bar.sync`. In the PTX memory model a CTA barrier orders
   the memory accesses of every participating thread before the barrier against every access after it
   ("barrier{.cta}" in the PTX ISA: prior memory accesses requested by the participating threads are performed
   relative to all of them), so the partials precede, in causality order, whatever the program does next.
2. The program then takes its ticket with `tl.atomic_add(TICKET, 1)`. Triton's default is `sem="acq_rel"` and
   `scope="gpu"` (triton.language.atomic_add in the Triton API reference), i.e. PTX `atom.acq_rel.gpu`: a release
   at GPU scope, which orders the program's earlier writes (step 1) before the increment for any thread of the GPU
   that acquires it (PTX ISA, "Memory Consistency Model": release and acquire patterns, morally strong operations,
   causality order, which is transitive through the barrier of step 1).
3. The tickets form one modification order, so exactly one program reads n_prog - 1, and that read-modify-write is
   also an acquire at GPU scope that reads from the releases of all the other programs' increments (a release
   sequence: every increment is an RMW). So all the partials happen before the last program's loads, which also
   bypass L1 (`cache_modifier=".cg"`), so no stale line of its SM can be read.
4. The last program resets the ticket with `tl.atomic_xchg(TICKET, 0)` (acq_rel, GPU scope). The next launch on the
   same stream starts after this one completes, and kernel completion makes its writes visible to later work in
   the stream (CUDA programming guide, stream semantics), so it finds 0. Launches on other streams use their own
   ticket and scratch (kernels/multi_exit/op.py, `Plan.scratch`); a CUDA graph replays the pointers of the
   stream it was captured on, and finds 0 for the same reason.
The interpreter runs programs one at a time and cannot exercise any of this; the GPU check's stress step does
(`python -m bench.kernel_stress`): thousands of launches over grids of 1 to many times the SM count, results
against float64 and bitwise across repeats, two streams, and a CUDA-graph replay of a step calling the op twice.
Sources: Triton API reference, triton.language.atomic_add / atomic_xchg (sem, scope and their defaults) and
triton.language.debug_barrier; NVIDIA PTX ISA, sections "Memory Consistency Model" and "bar, barrier"; CUDA C++
Programming Guide, "Streams".

Backward: the gradient is recomputed from the logits and the per-row statistics saved by the forward (no [E, B, C]
buffer is kept between the passes), scaled by the upstream gradient before it is rounded to the logits' dtype.

Exponentials: exp2 of pre-scaled arguments, one special-function op (MUFU.EX2) per logit per pass. Where a stream
needs its softmax at the KD temperature T and at 1, the forward's running sums take exp(z - m) as the T-th power of
exp((z - m)/T) (multiplications) when T is an integer, and the backward, whose gradients need it to fp32 accuracy,
evaluates it as a polynomial exp2 on the FMA pipe (as FlashAttention-4 does), as the forward does for a fractional T.
Numerics: every load is cast to fp32 at once (the interpreter's bf16 arithmetic is wrong). 1 - softmax_y is kept
as the mass of the other classes (the true class is left out of the running sums and added back per row), so the
true-class gradient of a confident row does not cancel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.multi_exit.tiles import (
    EPS_CE,
    EPS_NONE,
    HINT_L2,
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
    _closed_target,
    _labels,
    _lanes,
    _load,
    _row_off,
    _row_stats,
    _sweep,
    _true_tile,
)

# Per-program partial sums in the scratch buffer, PART[pid * PART_STRIDE + 3 * e + k] (k: ce, kd, hint), then the
# program's labelled-row count.


@triton.jit
def _fwd_tile(ZS, SZ, TZ, stride_t, rows, lanes, c0, C, y_cls, state, tstate, k_s, k_t, inv_t, inv_ts,
              N: tl.constexpr, TEACHER: tl.constexpr, KD_KL: tl.constexpr, POW_S: tl.constexpr,
              TWO_S: tl.constexpr, POW_T: tl.constexpr, TWO_T: tl.constexpr, SUM_Z: tl.constexpr,
              ALIGN: tl.constexpr, EXCL: tl.constexpr, MASKED: tl.constexpr):
    cols = c0 + lanes
    mask = cols < C
    not_y = cols != y_cls[:, None, None]  # unused (and not computed) unless EXCL
    # the teacher first: its exponentials weight every student's KD sum of this tile
    e_t = tl.zeros([1, 1, 1], tl.float32)
    tt = tl.zeros([1, 1, 1], tl.float32)
    r_t = tl.zeros([1, 1], tl.float32)
    if TEACHER == TEACHER_LOGITS:
        tz, t = _load(TZ, _row_off(rows, stride_t, ALIGN) + cols, mask, MASKED)
        m_t, lo_t, _, r_t, e_t = _sweep(t, tstate[0], tstate[1], tstate[1], not_y, k_t, POW=1, TWO=False,
                                        EXCL=EXCL)
        tstate = (m_t, lo_t)
        tt = tz * inv_t
    deep = state[N - 1]
    if TEACHER == TEACHER_DEEPEST:
        xz, x = _load(ZS[N - 1], _row_off(rows, SZ[N - 1], ALIGN) + cols, mask, MASKED)
        m, lo_a, lo_b, r_t, e_t = _sweep(x, deep[0], deep[1], deep[2], not_y, k_t, POW_T, TWO_T, EXCL)
        sz = deep[4] + tl.sum(xz, 2) if SUM_Z else deep[4]
        deep = (m, lo_a, lo_b, deep[3], sz)
        tt = xz * inv_t
    out = ()
    for s in tl.static_range(N):
        if TEACHER == TEACHER_DEEPEST and s == N - 1:
            out = out + (deep,)
        else:
            st = state[s]
            xz, x = _load(ZS[s], _row_off(rows, SZ[s], ALIGN) + cols, mask, MASKED)
            m, lo_a, lo_b, _, _ = _sweep(x, st[0], st[1], st[2], not_y, k_s, POW_S, TWO_S, EXCL)
            kd = st[3]
            if TEACHER == TEACHER_DEEPEST or TEACHER == TEACHER_LOGITS:
                if KD_KL:
                    kd = kd * r_t + tl.sum(e_t * (tt - xz * inv_ts), 2)
                else:
                    kd = kd * r_t - tl.sum(e_t * (xz * inv_ts), 2)
            sz = st[4] + tl.sum(xz, 2) if SUM_Z else st[4]
            out = out + ((m, lo_a, lo_b, kd, sz),)
    return out, tstate


@triton.jit
def _eps_tile(ZS, SZ, TZ, stride_t, rows, lanes, c0, C, y_cls, acc, lse_q, lse_t, k_q, k_t, b_row, ce_b,
              log_eps, N: tl.constexpr, TEACHER: tl.constexpr, EPS: tl.constexpr, ALIGN: tl.constexpr,
              MASKED: tl.constexpr):
    """Second sweep for log_eps: per student, (-sum tgt log(q + eps), sum tgt q / (q + eps)) of the eps term."""
    cols = c0 + lanes
    mask = cols < C
    is_y = cols == y_cls[:, None, None]
    tgt = tl.zeros([1, 1, 1], tl.float32)
    if EPS == EPS_CE:
        tgt = tl.where(is_y, ce_b, (1.0 - ce_b) / (C - 1))
    elif TEACHER == TEACHER_CLOSED:
        b_on, b_off = _closed_target(b_row, C)
        tgt = tl.where(is_y, b_on[:, None, None], b_off[:, None, None])
    elif TEACHER == TEACHER_LOGITS:
        _, t = _load(TZ, _row_off(rows, stride_t, ALIGN) + cols, mask, MASKED)
        tgt = tl.exp2(t * k_t - (lse_t * LOG2E)[:, None, None])
    elif TEACHER == TEACHER_DEEPEST:
        _, t = _load(ZS[N - 1], _row_off(rows, SZ[N - 1], ALIGN) + cols, mask, MASKED)
        tgt = tl.exp2(t * k_t - (lse_t * LOG2E)[:, None, None])
    out = ()
    for s in tl.static_range(N):
        if TEACHER == TEACHER_DEEPEST and s == N - 1:
            out = out + (acc[s],)
        else:
            _, x = _load(ZS[s], _row_off(rows, SZ[s], ALIGN) + cols, mask, MASKED)
            q = tl.exp2(x * k_q - (lse_q[s] * LOG2E)[:, None, None])
            t_ok = tl.where(mask, tgt, 0.0)
            loss = acc[s][0] - tl.sum(tl.sum(tl.where(mask, t_ok * tl.log(q + log_eps), 0.0), 2), 1)
            norm = acc[s][1] + tl.sum(tl.sum(t_ok * q / (q + log_eps), 2), 1)
            out = out + ((loss, norm),)
    return out


@triton.jit
def _hint_sums(FS, SF, rows, row_ok, D, N: tl.constexpr, HINT: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Per shallow exit, the row block's sum of (f_e - f_deepest)^2 (masked by (f_e > 0) | (f_deepest > 0) for sse);
    the deepest exit's features are read once per tile and shared."""
    acc = ()
    for s in tl.static_range(N - 1):
        acc = acc + (tl.zeros([BLOCK_B, BLOCK_D], tl.float32),)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (dc < D)[None, :]
        ft = tl.load(FS[N - 1] + rows[:, None] * SF[N - 1] + dc[None, :], mask=mask, other=0.0).to(tl.float32)
        new = ()
        for s in tl.static_range(N - 1):
            f = tl.load(FS[s] + rows[:, None] * SF[s] + dc[None, :], mask=mask, other=0.0).to(tl.float32)
            diff = f - ft
            if HINT == HINT_SSE:
                diff = tl.where((f > 0.0) | (ft > 0.0), diff, 0.0)
            new = new + (acc[s] + diff * diff,)
        acc = new
    out = ()
    for s in tl.static_range(N - 1):
        out = out + (tl.sum(tl.sum(acc[s], 1), 0),)
    return out


@triton.jit
def _fwd_kernel(
    ZS,  # tuple of N [B, C] logits (shallow -> deep), unit column stride, one float dtype
    SZ,  # tuple of their row strides
    FS,  # tuple of N [B, D] pooled features (read only with a hint)
    SF,  # tuple of their row strides
    TZ, stride_t,  # [B, C] external teacher logits (TEACHER == TEACHER_LOGITS)
    Y,  # [B] integer labels
    BROW,  # [B] closed-form teacher: mass on the true class (TEACHER == TEACHER_CLOSED)
    W,  # [N, 3] fp32 weights (ce, kd, hint)
    STATS,  # fp32 out: per-row statistics for the backward, hint factors, labelled-row count (layout above)
    PART,  # fp32 scratch [grid, PART_STRIDE]: per-program partial sums
    TICKET,  # int32 [1], 0 between launches: counts finished programs
    TOTAL,  # fp32 out []: the sum of every weighted term
    LOSSES,  # fp32 out [N, 3]: (ce, kd, hint) per exit, weighted
    B, C, D, ignore_index, inv_t, inv_ts, kd_scale, ce_b, log_eps, inv_bd,
    N: tl.constexpr, TEACHER: tl.constexpr, KD_KL: tl.constexpr, SMOOTH: tl.constexpr, HINT: tl.constexpr,
    EPS: tl.constexpr, POW_S: tl.constexpr, TWO_S: tl.constexpr, POW_T: tl.constexpr, TWO_T: tl.constexpr,
    BLOCK_B: tl.constexpr, NT: tl.constexpr, V: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    PART_STRIDE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows_ld = tl.minimum(rows, B - 1)
    valid, in_range, y_cls = _labels(Y, rows, row_ok, C, ignore_index)
    has_y = y_cls >= 0
    lanes = _lanes(NT, V, ALIGN)
    if ALIGN > 1:  # so the class mask is uniform over each vector
        C = tl.multiple_of(C, ALIGN)
    k_s = LOG2E * inv_ts
    k_t = LOG2E * inv_t
    SUM_Z: tl.constexpr = SMOOTH or TEACHER == TEACHER_CLOSED
    zero = tl.zeros([BLOCK_B, NT], tl.float32)
    state = ()
    for s in tl.static_range(N):
        state = state + ((zero + float("-inf"), zero, zero, zero, zero),)
    tstate = (zero + float("-inf"), zero)

    # Full tiles, then the partial one. With one row per program the tile holding the true class is taken out of
    # the loop, so the loop body needs no per-element exclusion of the true class.
    BLOCK_C: tl.constexpr = NT * V
    c_full = (C // BLOCK_C) * BLOCK_C
    c_y = _true_tile(y_cls, BLOCK_C, BLOCK_B)
    for c0 in range(0, c_full, BLOCK_C):
        if c0 != c_y:
            state, tstate = _fwd_tile(ZS, SZ, TZ, stride_t, rows_ld, lanes, c0, C, y_cls, state, tstate, k_s, k_t,
                                      inv_t, inv_ts, N, TEACHER, KD_KL, POW_S, TWO_S, POW_T, TWO_T, SUM_Z, ALIGN,
                                      EXCL=BLOCK_B > 1, MASKED=False)
    if c_full > 0 and (c_y >= 0) & (c_y < c_full):
        state, tstate = _fwd_tile(ZS, SZ, TZ, stride_t, rows_ld, lanes, c_y, C, y_cls, state, tstate, k_s, k_t,
                                  inv_t, inv_ts, N, TEACHER, KD_KL, POW_S, TWO_S, POW_T, TWO_T, SUM_Z, ALIGN,
                                  EXCL=True, MASKED=False)
    if c_full < C:
        state, tstate = _fwd_tile(ZS, SZ, TZ, stride_t, rows_ld, lanes, c_full, C, y_cls, state, tstate, k_s,
                                  k_t, inv_t, inv_ts, N, TEACHER, KD_KL, POW_S, TWO_S, POW_T, TWO_T, SUM_Z, ALIGN,
                                  EXCL=True, MASKED=True)

    # teacher statistics at T
    lse_t = tl.zeros([BLOCK_B], tl.float32)
    r_tch = tl.zeros([BLOCK_B], tl.float32)
    l_t = tl.zeros([BLOCK_B], tl.float32) + 1.0
    s_t = zero
    if TEACHER == TEACHER_LOGITS:
        t_y = tl.load(TZ + rows * stride_t + tl.where(has_y, y_cls, 0), mask=row_ok, other=0.0).to(tl.float32)
        lse_t, r_tch, _, _, l_t, s_t = _row_stats(tstate[0], tstate[1], tstate[1], t_y, has_y, k_t, inv_t,
                                                     POW=1, TWO=False)
    b_row = tl.zeros([BLOCK_B], tl.float32)
    if TEACHER == TEACHER_CLOSED:
        b_row = tl.load(BROW + rows, mask=row_ok, other=1.0).to(tl.float32)

    # per exit: row statistics, then the row losses
    st_base = STATS + rows
    n_rows = tl.sum(valid.to(tl.float32), 0)
    part = PART + pid.to(tl.int64) * PART_STRIDE
    lse_q = ()
    stats = ()
    if TEACHER == TEACHER_DEEPEST:
        deep = state[N - 1]
        z_y = tl.load(ZS[N - 1] + rows * SZ[N - 1] + tl.where(has_y, y_cls, 0), mask=row_ok, other=0.0)
        lse_t, r_tch, lse1_t, r1_t, l_t, s_t = _row_stats(deep[0], deep[1], deep[2], z_y.to(tl.float32), has_y,
                                                          k_t, inv_t, POW_T, TWO_T)
    for s in tl.static_range(N):
        st = state[s]
        z_y = tl.load(ZS[s] + rows * SZ[s] + tl.where(has_y, y_cls, 0), mask=row_ok, other=0.0).to(tl.float32)
        if TEACHER == TEACHER_DEEPEST and s == N - 1:
            lse_s, rs, lse1, r1 = lse_t, r_tch, lse1_t, r1_t
        else:
            lse_s, rs, lse1, r1, _, _ = _row_stats(st[0], st[1], st[2], z_y, has_y, k_s, inv_ts, POW_S, TWO_S)
        tl.store(st_base + (ST_LSE1 * N + s) * B, lse1, mask=row_ok)
        tl.store(st_base + (ST_R1 * N + s) * B, r1, mask=row_ok)
        tl.store(st_base + (ST_LSES * N + s) * B, lse_s, mask=row_ok)
        tl.store(st_base + (ST_RS * N + s) * B, rs, mask=row_ok)
        if EPS == EPS_NONE:  # every saved value is written, so the op's outputs are deterministic
            tl.store(st_base + (ST_WEPS * N + s) * B, tl.zeros([BLOCK_B], tl.float32), mask=row_ok)
        lse_q = lse_q + (lse1 if EPS == EPS_CE else lse_s,)
        sz = tl.sum(st[4], 1)
        if SMOOTH:
            ce_row = lse1 - ce_b * z_y - (1.0 - ce_b) / (C - 1) * (sz - z_y)
        else:
            ce_row = lse1 - z_y
        kd_row = tl.zeros([BLOCK_B], tl.float32)
        if TEACHER == TEACHER_CLOSED:
            b_on, b_off = _closed_target(b_row, C)
            kd_row = lse_s - inv_ts * (b_on * z_y + b_off * (sz - z_y))
            if KD_KL:
                kd_row += tl.where(b_on > 0.0, b_on * tl.log(b_on), 0.0)
                kd_row += tl.where(b_on < 1.0, (1.0 - b_on) * tl.log(b_off), 0.0)
        elif (TEACHER == TEACHER_DEEPEST and s != N - 1) or TEACHER == TEACHER_LOGITS:
            kd_row = tl.sum(st[3] * s_t, 1) / l_t + lse_s
            if KD_KL:
                kd_row -= lse_t
        stats = stats + ((ce_row, kd_row),)
    tl.store(STATS + (ROW_STATS * N) * B + rows, lse_t, mask=row_ok)
    tl.store(STATS + (ROW_STATS * N + 1) * B + rows, r_tch, mask=row_ok)

    if EPS != EPS_NONE:  # the second sweep of log(q + eps); the Beta-smoothing code's form
        acc = ()
        for s in tl.static_range(N):
            acc = acc + ((tl.zeros([BLOCK_B], tl.float32), tl.zeros([BLOCK_B], tl.float32)),)
        k_q = LOG2E if EPS == EPS_CE else k_s
        for c0 in range(0, c_full, BLOCK_C):
            acc = _eps_tile(ZS, SZ, TZ, stride_t, rows_ld, lanes, c0, C, y_cls, acc, lse_q, lse_t, k_q, k_t,
                            b_row, ce_b, log_eps, N, TEACHER, EPS, ALIGN, MASKED=False)
        if c_full < C:
            acc = _eps_tile(ZS, SZ, TZ, stride_t, rows_ld, lanes, c_full, C, y_cls, acc, lse_q, lse_t, k_q, k_t,
                            b_row, ce_b, log_eps, N, TEACHER, EPS, ALIGN, MASKED=True)
        new = ()
        for s in tl.static_range(N):
            tl.store(st_base + (ST_WEPS * N + s) * B, acc[s][1], mask=row_ok)
            if EPS == EPS_CE:
                new = new + ((acc[s][0], stats[s][1]),)
            else:
                new = new + ((stats[s][0], acc[s][0]),)
        stats = new

    hints = ()
    if HINT != HINT_NONE:
        hints = _hint_sums(FS, SF, rows, row_ok, D, N, HINT, BLOCK_B, BLOCK_D)
    for s in tl.static_range(N):
        ce_row, kd_row = stats[s]
        ce_row = tl.where(in_range, ce_row, float("nan"))  # an out-of-range label poisons CE, never reads astray
        tl.store(part + 3 * s, tl.sum(tl.where(valid, ce_row, 0.0), 0))
        if TEACHER == TEACHER_CLOSED:
            tl.store(part + 3 * s + 1, tl.sum(tl.where(valid & in_range, kd_row, 0.0), 0))
        else:
            tl.store(part + 3 * s + 1, tl.sum(tl.where(row_ok, kd_row, 0.0), 0))
        if HINT != HINT_NONE and s < N - 1:
            tl.store(part + 3 * s + 2, hints[s])
        else:  # no hint, or the deepest exit, the hints' teacher
            tl.store(part + 3 * s + 2, 0.0)
    tl.store(part + 3 * N, n_rows)

    # the last program to finish reduces every program's partials, in program order
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET, 1)
    if ticket == n_prog - 1:
        _reduce(PART, W, STATS, TOTAL, LOSSES, TICKET, n_prog, B, D, kd_scale, inv_bd, N, TEACHER, HINT,
                PART_STRIDE, BLOCK_P)


@triton.jit
def _reduce(PART, W, STATS, TOTAL, LOSSES, TICKET, n_prog, B, D, kd_scale, inv_bd, N: tl.constexpr,
            TEACHER: tl.constexpr, HINT: tl.constexpr, PART_STRIDE: tl.constexpr, BLOCK_P: tl.constexpr):
    j = tl.arange(0, PART_STRIDE)
    acc = tl.zeros([BLOCK_P, PART_STRIDE], tl.float32)
    for p0 in range(0, n_prog, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(PART + p[:, None].to(tl.int64) * PART_STRIDE + j[None, :], mask=(p < n_prog)[:, None],
                       other=0.0, cache_modifier=".cg")
    sums = tl.sum(acc, 0)
    n_valid = tl.sum(tl.where(j == 3 * N, sums, 0.0), 0)
    term = j % 3
    w = tl.load(W + j, mask=j < 3 * N, other=0.0)
    kd_rows = n_valid if TEACHER == TEACHER_CLOSED else B * 1.0
    loss = tl.where(term == 0, w * sums / n_valid, w * kd_scale * sums / kd_rows)
    fscale = tl.zeros([PART_STRIDE], tl.float32)
    if HINT == HINT_SSE:
        hint_loss = w * sums
        fscale = 2.0 * w
    elif HINT == HINT_L2:  # torch.dist: one un-squared norm over the whole batch
        norm = tl.sqrt(sums)
        hint_loss = w * norm
        fscale = tl.where(norm > 0.0, w / norm, 0.0)
    else:
        hint_loss = w * sums * inv_bd
        fscale = 2.0 * w * inv_bd
    loss = tl.where(term == 2, hint_loss, loss)
    loss = tl.where((w == 0.0) | (j >= 3 * N), 0.0, loss)  # a weight of 0 drops the term, NaN included
    tl.store(LOSSES + j, loss, mask=j < 3 * N)
    tl.store(TOTAL, tl.sum(loss, 0))
    tail = STATS + (ROW_STATS * N + 2) * B
    tl.store(tail + j // 3, fscale, mask=(term == 2) & (j < 3 * N))
    tl.store(tail + N, n_valid)
    tl.atomic_xchg(TICKET, 0)
