"""kernels/aot/check.py: the kernels compile for sm_90 exactly as a launch specializes them, and the SASS counting,
traffic and spill figures behind the performance proxy are right on small kernels whose counts are known by
construction, and plausible on the fused loss itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]


def _has_nvidia_backend() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend / ptxas")


@triton.jit
def exp_row_sum(x_row, length, TILE: tl.constexpr):
    # a loop inside a helper, over the helper's own parameter names: its trip count needs the call-site binding
    acc = tl.zeros([TILE], tl.float32)
    for c0 in range(0, length, TILE):  # the probed loop
        cols = c0 + tl.arange(0, TILE)
        acc += tl.exp(tl.load(x_row + cols, mask=cols < length, other=float("-inf")))
    return tl.sum(acc)


@triton.jit
def tiny(X, OUT, n_rows, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    total = exp_row_sum(X + row * n_cols, n_cols, BLOCK)
    tl.store(OUT + row, total, mask=row < n_rows)


@triton.jit
def cubic_exp_sum(x_row, length, TILE: tl.constexpr):
    acc = tl.zeros([TILE], tl.float32)
    for c0 in range(0, length, TILE):  # the costly side
        cols = c0 + tl.arange(0, TILE)
        x = tl.load(x_row + cols, mask=cols < length, other=0.0)
        acc += tl.exp(x) * tl.exp(2.0 * x) + tl.exp(3.0 * x)
    return tl.sum(acc)


@triton.jit
def branchy(X, OUT, FLAG, n_cols, BLOCK: tl.constexpr, SKIP: tl.constexpr):
    # a runtime if/else with a loop on each side, the costlier one (three exponentials per element) in a helper; a
    # dead constexpr branch calls the same helper with twice the length: only the live call may bind its trip
    if SKIP:
        total = cubic_exp_sum(X, 2 * n_cols, BLOCK)
    elif tl.load(FLAG) > 0:
        acc = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, n_cols, BLOCK):  # the cheap side
            x = tl.load(X + c0 + tl.arange(0, BLOCK), mask=c0 + tl.arange(0, BLOCK) < n_cols, other=0.0)
            acc += tl.exp(x)
        total = tl.sum(acc)
    else:
        total = cubic_exp_sum(X, n_cols, BLOCK)
    tl.store(OUT, total)


@triton.jit
def per_exit(X, OUT, n_cols, BLOCK: tl.constexpr, N_EXITS: tl.constexpr):
    # one program for several exits, unrolled by the front end: one SASS loop per exit, each with the full trip
    for e in tl.static_range(N_EXITS):
        acc = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, n_cols, BLOCK):  # the per-exit loop
            x = tl.load(X + e * n_cols + c0 + tl.arange(0, BLOCK), mask=c0 + tl.arange(0, BLOCK) < n_cols, other=0.0)
            acc += tl.exp(x)
        tl.store(OUT + e, tl.sum(acc))


@triton.jit
def _exp_twice(x_row, c0, length, BLOCK: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK)
    x = tl.load(x_row + cols, mask=cols < length, other=float("-inf"))
    return tl.exp(x) * tl.exp(2.0 * x)


@triton.jit
def full_tiles_and_tail(X, OUT, n_cols, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # the fused loss's class loop: full tiles up to a bound computed from the arguments, then one masked tail
    if ALIGN > 1:
        n_cols = tl.multiple_of(n_cols, ALIGN)
    c_full = (n_cols // BLOCK) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, c_full, BLOCK):  # the full tiles
        # the tail's helper too (so without inlining records its lines alone cannot tell loop from tail), and a
        # body big enough that ptxas does not unroll it
        acc += _exp_twice(X, c0, n_cols, BLOCK) * _exp_twice(X + 1, c0, n_cols, BLOCK)
    if c_full < n_cols:
        acc += _exp_twice(X, c_full, n_cols, BLOCK)
    tl.store(OUT, tl.sum(acc))


@triton.jit
def one_tile_out(X, Y, OUT, n_cols, BLOCK: tl.constexpr):
    # the fused loss's class loop with the true class's tile taken out: the loop skips one tile (the data says
    # which), the tile after it runs once when there are full tiles, then the tail
    c_full = (n_cols // BLOCK) * BLOCK
    y = tl.load(Y)
    c_y = (y // BLOCK) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, c_full, BLOCK):  # the tiles without the true class
        if c0 != c_y:
            acc += _exp_twice(X, c0, n_cols, BLOCK) * _exp_twice(X + 1, c0, n_cols, BLOCK)
    if c_full > 0 and (c_y >= 0) & (c_y < c_full):
        acc += _exp_twice(X, c_y, n_cols, BLOCK) * _exp_twice(X + 1, c_y, n_cols, BLOCK)
    if c_full < n_cols:
        acc += _exp_twice(X, c_full, n_cols, BLOCK)
    tl.store(OUT, tl.sum(acc))


@triton.jit
def last_program_reduces(PART, TICKET, OUT, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(PART + pid, tl.exp(tl.load(PART + pid)))
    n_prog = tl.num_programs(0)
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET, 1)
    if ticket == n_prog - 1:
        acc = tl.zeros([BLOCK], tl.float32)
        for p0 in range(0, n_prog, BLOCK):  # the reduction
            p = p0 + tl.arange(0, BLOCK)
            x = tl.load(PART + p, mask=p < n_prog, other=0.0)
            acc += tl.exp(x) * tl.exp(2.0 * x) + tl.exp(3.0 * x) * tl.exp(4.0 * x)
        tl.store(OUT, tl.sum(acc))


@triton.jit
def tuple_reader(XS, OUT, n, BLOCK: tl.constexpr):
    # XS[1] is passed and never dereferenced: its bytes are no traffic
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + offs, tl.load(XS[0] + offs, mask=offs < n) + tl.load(XS[2] + offs, mask=offs < n), mask=offs < n)


@triton.jit
def register_hungry(X, OUT, BLOCK: tl.constexpr):
    # a [BLOCK] fp32 tile over one warp needs BLOCK / 32 registers a thread; more than maxnreg allows forces spills
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(OUT + offs, x * tl.sum(tl.exp(x)))


def _probe() -> dict:
    """Runs in a subprocess without the interpreter (the suite runs under TRITON_INTERPRET=1, where nothing can be
    compiled): capture, specialize, compile and count the small kernels. '<name> flat' repeats a count with the
    line info stripped of its inlining records, as Triton 3.6 emits it."""
    import re

    from kernels.aot import check as aot_check
    from kernels.aot.source import Source

    def launch(kernel, grid, *args, **kwargs):
        launches = []
        with aot_check.intercept(launches, ["forward"]):
            kernel[grid](*args, **kwargs)
        [captured] = launches
        return captured

    disassemble = aot_check._run_tool

    def flat(*args):
        return re.sub(r'(//## File "[^"]+", line \d+) inlined at[^\n]*\n(?:\s*//##[^\n]*\n)*', r"\1\n",
                      disassemble(*args))

    out = {}
    for rows, cols in ((256, 1000), (256, 1992), (1, 1000)):
        cap = launch(tiny, (rows,), torch.empty(rows, cols), torch.empty(rows), rows, cols, BLOCK=128, num_warps=1)
        spec = aot_check.compile_launch(cap, 90)[2]
        out[f"{rows}x{cols}"] = dict(aot_check.analyse(cap, 90, Source()), grid_captured=list(cap.grid),
                                     raw_spec={k: list(v) for k, v in spec.items()})
    cap_branchy = launch(branchy, (1,), torch.empty(1000), torch.empty(1), torch.ones(1, dtype=torch.int32), 1000,
                         BLOCK=128, SKIP=False, num_warps=1)
    out["branchy"] = aot_check.analyse(cap_branchy, 90, Source())
    out["per_exit"] = aot_check.analyse(launch(per_exit, (1,), torch.empty(3, 1000), torch.empty(3), 1000, BLOCK=128,
                                               N_EXITS=3, num_warps=1), 90, Source())
    for n, align in ((1000, 8), (1024, 16)):
        cap = launch(full_tiles_and_tail, (1,), torch.empty(n), torch.empty(1), n, BLOCK=128, ALIGN=align, num_warps=1)
        out[f"tail {n}"] = aot_check.analyse(cap, 90, Source())
    for n in (1000, 100):
        cap = launch(one_tile_out, (1,), torch.empty(n), torch.zeros(1, dtype=torch.int32), torch.empty(1), n,
                     BLOCK=128, num_warps=1)
        out[f"one tile out {n}"] = aot_check.analyse(cap, 90, Source())
    for n, block in ((256, 128), (64, 32)):  # 4 or 1 elements a thread: a one-element body gets unrolled
        cap = launch(last_program_reduces, (n,), torch.empty(n), torch.zeros(1, dtype=torch.int32), torch.empty(1),
                     BLOCK=block, num_warps=1)
        out[f"last program {block}"] = aot_check.analyse(cap, 90, Source())
    xs = (torch.empty(100), torch.empty(1000), torch.empty(300))
    out["tuple"] = aot_check.analyse(launch(tuple_reader, (1,), xs, torch.empty(100), 100, BLOCK=128), 90, Source())
    out["tuple"]["bytes"] = aot_check._union(out["tuple"]["spans"])
    for regs in (None, 32):
        cap = launch(register_hungry, (1,), torch.empty(4096), torch.empty(4096), BLOCK=4096, num_warps=1,
                     **({"maxnreg": regs} if regs else {}))
        out[f"regs {regs}"] = aot_check.analyse(cap, 90, Source())
    aot_check._run_tool = flat
    out["branchy flat"] = aot_check.analyse(cap_branchy, 90, Source())
    cap = launch(tiny, (256,), torch.empty(256, 1000), torch.empty(256), 256, 1000, BLOCK=128, num_warps=1)
    out["256x1000 flat"] = aot_check.analyse(cap, 90, Source())
    for n, align in ((1000, 8), (1024, 16)):
        cap = launch(full_tiles_and_tail, (1,), torch.empty(n), torch.empty(1), n, BLOCK=128, ALIGN=align, num_warps=1)
        out[f"tail {n} flat"] = aot_check.analyse(cap, 90, Source())
    return out


def _where(tag: str) -> str:
    """'test_kernels_aot.py:<line>' of the line of this file that ends with tag, as the tool names source loops."""
    lines = Path(__file__).read_text().splitlines()
    return f"{Path(__file__).name}:{next(i for i, s in enumerate(lines, 1) if s.endswith(tag))}"


@pytest.fixture(scope="module")
def probe() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_specialization_is_the_launch_one(probe):
    """Integers divisible by 16 carry the divisibility attribute, others not, ==1 becomes a constexpr, aligned
    tensors are marked aligned: Triton's own rules applied to the captured arguments."""
    spec = probe["256x1000"]["raw_spec"]
    assert spec["n_rows"] == ["i32", "D"] and spec["n_cols"] == ["i32", ""]
    assert spec["X"] == ["*fp32", "D"] and spec["BLOCK"] == ["constexpr", 128]
    assert probe["1x1000"]["raw_spec"]["n_rows"] == ["constexpr", 1]
    assert probe["256x1000"]["grid_captured"] == [256]


def test_loop_trip_and_per_element_counts(probe):
    """One row of C=1000 in tiles of 128 over one warp: the helper's loop runs ceil(1000/128) = 8 times, each thread
    takes 4 columns per tile, so the dynamic MUFU.EX2 count is 8 x 4 per thread (1024 per 1000 elements)."""
    k = probe["256x1000"]
    [loop] = k["loops"]
    assert loop["where"] == _where("# the probed loop")
    assert loop["trip"] == 8 and loop["counted"] and not k["notes"]
    assert k["ops"]["MUFU.EX2"] == 32
    assert k["grid"] == 256 and k["warps"] == 1
    # 1992 columns (not a multiple of 16 either: the same binary) double the trip: exactly 8 more loop bodies
    k2 = probe["256x1992"]
    assert k2["loops"][0]["trip"] == 16 and k2["static"] == k["static"]
    assert k2["per_thread"] - k["per_thread"] == 8 * loop["body"]
    assert k2["ops"]["MUFU.EX2"] == 64
    # without inlining records the helper's loop still gets its trip, through the call found in the source
    flat = probe["256x1000 flat"]
    assert flat["loops"] == k["loops"] and flat["ops"] == k["ops"]


@pytest.mark.parametrize("name", ["branchy", "branchy flat"])
def test_runtime_branch_counts_its_costlier_side_only(probe, name):
    """Both loops exist in the SASS; the model counts the else side (3 exponentials per element: 8 tiles x 4
    columns x 3 per thread), not the sum of both sides, and names the choice. The costly loop sits in a helper that
    a dead constexpr branch also calls with twice the length: the trip is the live call's, 8, not 16."""
    k = probe[name]
    cheap, costly = _where("# the cheap side"), _where("# the costly side")
    loops = {lp["where"]: lp for lp in k["loops"]}
    assert set(loops) == {cheap, costly}
    assert not loops[cheap]["counted"] and loops[costly]["counted"]
    assert all(lp["trip"] == 8 for lp in k["loops"])
    assert k["ops"]["MUFU.EX2"] == 8 * 4 * 3
    assert len(k["notes"]) == 1 and "else side" in k["notes"][0]


def test_static_range_copies_each_count_the_full_trip(probe):
    """tl.static_range(3) around a runtime loop: three SASS loops of the same source `for`, each 8 trips, no warning
    (the model must not mistake them for a partial unroll)."""
    k = probe["per_exit"]
    assert [(lp["where"], lp["trip"]) for lp in k["loops"]] == [(_where("# the per-exit loop"), 8)] * 3
    assert not k["notes"] and k["ops"]["MUFU.EX2"] == 3 * 8 * 4


@pytest.mark.parametrize("flat", ["", " flat"])
def test_loop_bound_from_locals_and_tail_under_runtime_if(probe, flat):
    """c_full = (n // 128) * 128 with n passed through tl.multiple_of under a constexpr if: the full-tile loop runs
    n // 128 times (16 exponentials a thread each), the tail (8) once when 128 does not divide n, never when it
    does; with and without inlining records."""
    for n, trip, ex2 in ((1000, 7, 7 * 16 + 8), (1024, 8, 8 * 16)):
        k = probe[f"tail {n}{flat}"]
        assert [(lp["where"], lp["trip"]) for lp in k["loops"]] == [(_where("# the full tiles"), trip)]
        assert k["ops"]["MUFU.EX2"] == ex2 and not k["notes"]


def test_the_tile_taken_out_of_the_loop_counts_once(probe):
    """`if c0 != c_y` in the loop over c0 runs on every trip but one, and the tile after the loop once, only when
    full tiles exist (`c_full > 0 and ...` decides without the data): 7 tiles of 16 exponentials + the tail's 8 at
    n = 1000, the tail alone at n = 100."""
    assert probe["one tile out 1000"]["ops"]["MUFU.EX2"] == 7 * 16 + 8
    assert probe["one tile out 100"]["ops"]["MUFU.EX2"] == 8


def test_last_program_code_counts_once_per_launch(probe):
    """The block under `if ticket == n_prog - 1` (ticket from tl.atomic_add) runs in one of 256 programs: its loop
    over tl.num_programs(0) in tiles of 128 runs twice, 16 exponentials a thread each, which adds 2 * 16 / 256 to
    every program's one exponential. A loop ptxas unrolled (one element a thread) is flagged."""
    k = probe["last program 128"]
    assert [(lp["where"], lp["trip"]) for lp in k["loops"]] == [(_where("# the reduction"), 2)]
    assert k["ops"]["MUFU.EX2"] == 1 + 2 * 16 / 256 and not k["notes"]
    assert len(probe["last program 32"]["notes"]) == 1 and "unrolled" in probe["last program 32"]["notes"][0]


def test_tuple_arguments_count_as_traffic(probe):
    """A tuple of three fp32 tensors (100, 1000, 300 elements) of which the kernel reads the first and the third,
    plus a 100-element output: 4 * (100 + 300 + 100) bytes, the unread 1000 not included."""
    assert probe["tuple"]["bytes"] == 4 * (100 + 300 + 100)


def test_spills_are_what_ptxas_reports(probe):
    """A [4096] fp32 tile on one warp (128 values a thread) fits in 165 registers without spilling; capped at 32
    registers (maxnreg) it spills: ptxas's spill bytes and the SASS's STL / LDL say so, for the same assembly."""
    free, capped = probe["regs None"], probe["regs 32"]
    assert free["ptxas"]["regs"] == free["reg"] > 128 and free["ptxas"]["spill_st"] == free["ptxas"]["spill_ld"] == 0
    assert free["stl_ldl"] == 0
    assert capped["ptxas"]["regs"] == capped["reg"] == 32 and capped["stl_ldl"] > 0
    assert capped["ptxas"]["spill_st"] > 0 and capped["ptxas"]["spill_ld"] > 0


def test_quick_mode_compiles_every_launched_kernel(tmp_path):
    """The real launcher, forward and backward, at the headline and the large shape: every kernel it launches
    compiles and has ptxas's spill report, every loop maps to a source `for` with a known trip (the class loop:
    C // BLOCK_C full tiles, none at C=1000 < BLOCK_C), each pass's traffic is its distinct tensors (logits and
    features read; in the backward their gradients written too), and the per-element instruction count of the
    large shape sits a little above its class loop's own rate (the tail and the per-row work)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    out = tmp_path / "aot_quick.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.aot.check", "--quick", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["failures"] == 0 and len(res["variants"]) == 2
    ints = {}
    for v in res["variants"]:
        assert {k["phase"] for k in v["kernels"]} == {"forward", "backward"}
        for k in v["kernels"]:
            assert k["reg"] > 0 and k["static"] > 0 and k["ptxas"]["regs"] == k["reg"]
            assert all(lp["where"] != "?" and lp["trip"] is not None for lp in k["loops"]), k["loops"]
            c = k["ints"]
            block_c, elems = c["NT"] * c["V"], c["N"] * c["BLOCK_B"] * c["NT"] * c["V"] / (k["warps"] * 32)
            [cls] = [lp for lp in k["loops"] if lp["trip"] == c["C"] // block_c and lp["body"] > 200]
            if c["C"] == 32000:  # instructions a logit element, over the class loop's own rate
                assert 1.0 < v["passes"][k["phase"]]["instr"] / (cls["body"] / elems) < 1.35
            for name, val in k["ints"].items():
                if k["spec"][name] != "constexpr":
                    ints.setdefault(val, set()).add(k["spec"][name])
        for p in v["passes"].values():
            assert p["launches"] and p["instr"] > 0 and p["bytes"] > 0 and p["dram_us"] > 0
    assert ints[256] == {"i32/16"} and ints[1000] == {"i32"}  # B=256 and C=1000 of the headline shape
    for v, (E, B, C) in zip(res["variants"], ((4, 4096, 32000), (4, 256, 1000))):  # the headline after the large
        logits, feats, p = E * B * C * 2, E * B * 512 * 2, v["passes"]  # and no buffer of the large one counted
        assert logits + feats < p["forward"]["bytes"] < 1.03 * (logits + feats)
        assert 2 * (logits + feats) < p["backward"]["bytes"] < 1.03 * 2 * (logits + feats)


if __name__ == "__main__":
    print(json.dumps(_probe()))
