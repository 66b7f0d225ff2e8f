"""Compile the fused-loss kernels for a GPU target without a GPU (Triton's offline compiler + the bundled ptxas).

The interpreter runs the kernels' Python on CPU, so it cannot catch what only the real compiler rejects (types that
do not unify across branches, unsupported ops, register spills); this does, on any machine:

    TRITON_INTERPRET=0 python -m kernels.aot_check [--arch 90] [--quick]

Prints one line per kernel variant ("ok|FAIL <kernel> <seconds> REG:<n> STACK:<bytes> <variant>"; STACK > 0 means
register spills); exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def _signature(fn, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return sig


def _pointer_types(names: list[str], dtype: str) -> dict[str, str]:
    return {n: f"*{dtype}" for n in names}


def _variants(quick: bool):
    """(TEACHER, HINT, dtype, C, SAME_T, SMOOTH, KD_KL); block sizes come from the launcher's own heuristic.
    SAME_T also selects the recompute_grad kernels (STORE_G off, RECOMPUTE on) so both modes get compiled."""
    if quick:
        yield from [(1, 1, "bf16", 32000, False, True, True), (2, 2, "fp16", 10, True, False, False)]
        return
    for teacher, hint in itertools.product((1, 2, 0), (1, 2, 3, 0)):
        yield teacher, hint, "bf16", 1000, False, True, True
    for dt, c in itertools.product(("fp32", "bf16", "fp16"), (10, 100, 1000, 32000)):
        yield 1, 1, dt, c, False, True, True
    for teacher, same_t, smooth, kl in itertools.product((1, 2), (True, False), (True, False), (True, False)):
        yield teacher, 1, "bf16", 1000, same_t, smooth, kl


def _resource_usage(cubin: bytes) -> str:
    """REG/STACK of the cubin via the cuobjdump bundled with Triton ('' if it is missing)."""
    import shutil
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    return " ".join(w for w in line.split() if w.startswith(("REG:", "STACK:")))


def _jobs(quick: bool):
    from kernels import multi_exit_triton as K
    from kernels.multi_exit_loss import _blocks

    ints = {n: "i64" for n in ("exit_base", "B", "C", "D", "NB", "ignore_index", "stride_t", "stride_ft", "s_gl0",
                               "s_gl1", "SZ0", "SZ1", "SZ2", "SZ3", "SF0", "SF1", "SF2", "SF3")}
    floats = {n: "fp32" for n in ("inv_t", "inv_ts", "kd_scale", "ce_b", "inv_bd")}
    for teacher, hint, dt, c, same_t, smooth, kl in _variants(quick):
        bb, bc, bd, warps = _blocks(1024, c, 512, 0)
        common = dict(TEACHER=teacher, SAME_T=same_t, HINT=hint, N_SLOTS=4, BLOCK_B=bb, BLOCK_C=bc, BLOCK_D=bd)
        types = {**_pointer_types(["Z0", "Z1", "Z2", "Z3", "T", "G", "OUT", "F0", "F1", "F2", "F3", "FT", "OUTF"], dt),
                 **_pointer_types(["BROW", "W", "NVALID", "FR", "STATS", "PART", "GL", "FSCALE"], "fp32"),
                 "Y": "*i64", **ints, **floats}
        yield K._fwd_kernel, types, dict(common, KD_KL=kl, SMOOTH=smooth, STORE_G=not same_t), warps, f"{dt} C={c}"
        yield K._bwd_kernel, types, dict(common, RECOMPUTE=same_t), warps, f"{dt} C={c}"
    yield K._count_kernel, {"Y": "*i64", "NVALID": "*fp32", "B": "i32", "ignore_index": "i64"}, dict(BLOCK=1024), 4, ""
    for hint in (1, 2, 3):
        types = {"PART": "*fp32", "W": "*fp32", "LOSS": "*fp32", "FSCALE": "*fp32", "NB": "i32", "inv_bd": "fp32"}
        yield K._finalize_kernel, types, dict(HINT=hint, BLOCK=1024), 4, ""


def compile_all(arch: int, quick: bool) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter replaces the kernels with Python")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's notice; the launch default
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for fn, types, constexprs, warps, label in _jobs(quick):
        t0 = time.perf_counter()
        detail = f"{label} {constexprs} num_warps={warps}"
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs)
            k = triton.compile(src, target=target, options={"num_warps": warps})
            usage = _resource_usage(k.asm["cubin"]) or "usage n/a"
            print(f"ok   {fn.__name__} {time.perf_counter() - t0:.1f}s {usage} {detail}", flush=True)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {fn.__name__} {detail}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100), 90 (H100)")
    p.add_argument("--quick", action="store_true", help="one representative variant per kernel")
    a = p.parse_args(argv)
    return compile_all(a.arch, a.quick)


if __name__ == "__main__":
    sys.exit(main())
