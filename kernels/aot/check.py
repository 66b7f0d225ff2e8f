"""Compile the fused loss's kernels for a GPU on a machine without one, exactly as a launch would, and predict speed.

    TRITON_INTERPRET=0 python -m kernels.aot.check [--arch 90] [--quick] [--md FILE] [--json FILE] [--python PY ...]
                                                   [--sms 132] [--clock-ghz 1.98] [--dram-tbs 4.3]

Capture: the public launcher (kernels.multi_exit.op.multi_exit_loss) runs forward and backward on CPU tensors
of the real shapes (allocated, not filled) with Triton's launch (and its `*check_device*` guard) intercepted: each
launch is recorded with its arguments (tuples too), grid and options (an autotuned kernel: its first config), then
compiled by Triton's own JITFunction.run(warmup=True) for a stand-in GPUTarget("cuda", arch, 32) driver, so integer
specialization, pointer alignment (torch CPU data is 64-byte aligned, like CUDA's) and constexprs follow the
installed Triton's rules. --python runs the same under other interpreters (the GPU machine's Triton).

Per kernel: registers, shared memory, stack frame (cuobjdump); spills: the spill store + load bytes of `ptxas -v`
on the kernel's PTX with Triton's flags (checked to give the same registers: the tables' "spill B") and the SASS's
STL / LDL (static; dynamic per element): a stack frame alone is no spill. Instruction counts: the SASS model below.
    per element  per-thread count x threads launched / ((E + T) * B * C), every logit element the pass reads (T = 1
                 with an external teacher's logits, else 0); MUFU.* alike
Pass model, per pass (forward, backward), defaults for an H200:
    issue = warp instructions / (SMs x 4 schedulers x clock)
    MUFU  = MUFU ops / (SMs x 16 per clock x clock)
    DRAM  = bytes / measured copy bandwidth (read + written); bytes = every distinct tensor a pass's kernels
            dereference (TTIR; tuple elements each), counted once: re-reads are assumed to hit L2
    Only Triton launches count: torch ops around them (zero-fills, copies) are in none of these figures.
Targets (at C=32000, bf16): 0 spills, <= 2.5 MUFU per logit element over forward + backward, issue <= DRAM per pass.
Exit status 1 if any launch fails to compile.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, namedtuple
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nv
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from kernels.aot import sass as aot_sass
from kernels.aot import source as aot_source
from kernels.aot.report import markdown, render

BYOT = dict(teacher="deepest", ce_weight=0.9, kd_weight=0.1, hint_weight=1e-6, temperature=3.0, kd="kl",
            t_squared=True)
BYOT_SSE = dict(BYOT, hint="sse")
KD = dict(teacher="logits", ce_weight=0.5, kd_weight=0.5, temperature=4.0, t_squared=True)
BETA = dict(teacher="closed_form", ce_weight=0.5, kd_weight=0.5)
BETA_EPS = dict(BETA, kd="soft_ce", log_eps=1e-8)  # the Beta-smoothing code's log(q + 1e-8): the second sweep
SMOOTH = dict(teacher="none", label_smoothing=0.1)
HEADLINE, LARGE = (4, 256, 1000), (4, 4096, 32000)
# (label, (E, B, C), feature dim D, dtype, launcher keyword options)
QUICK = [("byot+sse", LARGE, 512, "bf16", BYOT_SSE), ("byot+sse", HEADLINE, 512, "bf16", BYOT_SSE)]
_MODES = [("byot+sse T=2.5 (poly exp2)", 512, dict(BYOT_SSE, temperature=2.5)), ("kd logits-teacher", 0, KD),
          ("closed-form (beta)", 0, BETA), ("closed-form soft_ce log_eps", 0, BETA_EPS),
          ("none + smoothing", 0, SMOOTH), ("none + smoothing log_eps", 0, dict(SMOOTH, log_eps=1e-8))]
FULL = QUICK + [(lbl, shape, 512, dt, BYOT_SSE) for shape in (LARGE, HEADLINE) for lbl, dt in
                (("byot+sse", "fp32"), ("byot+sse", "fp16"))] + [
    (lbl, shape, D, "bf16", opts) for shape in (LARGE, HEADLINE) for lbl, D, opts in _MODES] + [
    ("byot+l2", HEADLINE, 512, "bf16", dict(BYOT, hint="l2")),
    ("byot+mse", HEADLINE, 512, "bf16", dict(BYOT, hint="mse")),
    ("byot T=1 soft_ce", HEADLINE, 0, "bf16", dict(BYOT, temperature=1.0, kd="soft_ce"))]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


# ------------------------------------------------------------------------------------------------------- capture

class Arg:
    """What Triton's specializer reads from a tensor (dtype, data_ptr), plus its byte span, without its memory."""

    def __init__(self, t):
        self.dtype, self.ptr = t.dtype, t.data_ptr()
        extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        self.span = (self.ptr, self.ptr + extent * t.element_size())
        self.keep = t.untyped_storage()  # no other tensor may reuse these addresses while the spans are compared

    def data_ptr(self) -> int:
        return self.ptr


Launch = namedtuple("Launch", "fn args kwargs grid phase")  # fn: the JITFunction


@contextlib.contextmanager
def intercept(launches: list, phase: list):
    """Record instead of launch: JITFunction.run (an autotuned kernel with its first config: which one wins is only
    known on a GPU), plus the launcher's device guard, which refuses CPU tensors outside the interpreter; the
    launcher's caches start empty."""
    import kernels.multi_exit.op as launcher  # decorates the kernels: only with TRITON_INTERPRET=0

    def wrap(a):
        return Arg(a) if isinstance(a, torch.Tensor) else tuple(map(wrap, a)) if isinstance(a, tuple) else a

    def record(self, *args, grid, warmup=False, **kwargs):
        args, kwargs = tuple(map(wrap, args)), {k: wrap(v) for k, v in kwargs.items()}
        if callable(grid):
            bound = self.signature.bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                           if k in self.signature.parameters})
            bound.apply_defaults()
            grid = grid(dict(bound.arguments))
        launches.append(Launch(self, args, kwargs, tuple(grid), phase[0]))

    def first_config(self, *args, **kwargs):
        self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())

    for f in vars(launcher).values():  # a fresh launcher, as in a new process: no scratch grown by an earlier shape
        if hasattr(f, "cache_clear") and hasattr(f, "cache_info"):
            f.cache_clear()
    saved = [(JITFunction, "run", JITFunction.run), (Autotuner, "run", Autotuner.run)]
    saved += [(launcher, n, getattr(launcher, n)) for n in dir(launcher) if "check_device" in n]
    JITFunction.run, Autotuner.run = record, first_config
    for _, name, _ in saved[2:]:
        setattr(launcher, name, lambda *a, **k: None)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def capture(shape: tuple, D: int, dtype: str, options: dict) -> list[Launch]:
    from kernels.multi_exit.op import multi_exit_loss  # decorates the kernels: only with TRITON_INTERPRET=0

    E, B, C = shape
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    leaf = dict(dtype=dt, requires_grad=True)
    z = [torch.empty(B, C, **leaf) for _ in range(E)]
    feats = [torch.empty(B, D, **leaf) for _ in range(E)] if D else []
    # the launcher takes teacher logits / soft_b only in their teacher modes (allocated, never touched, otherwise)
    extra = dict(features=feats or None, teacher_logits=torch.empty(B, C, dtype=dt), soft_b=torch.full((B,), 0.9))
    launches, phase = [], ["forward"]
    with intercept(launches, phase):
        out = multi_exit_loss(z, torch.zeros(B, dtype=torch.long), **extra, **options)
        phase[0] = "backward"
        # autograd.grad, not backward(): accumulating into .grad could copy (and so touch) gigabytes on the CPU
        torch.autograd.grad(out.sum(), z + feats, allow_unused=True)
    return launches


# ------------------------------------------------------------------------------------------------------- compile

def _driver(arch: int):
    """The CUDA driver as a warm-up compile uses it: target, device key (binder caches are per device), stream."""
    target = GPUTarget("cuda", arch, 32)
    return SimpleNamespace(get_current_target=lambda: target, get_current_device=lambda: ("aot", arch),
                           get_current_stream=lambda device=None: 0)


def compile_launch(launch: Launch, arch: int):
    """(CompiledKernel, bound arguments, {parameter: (type or 'constexpr', specialization or value)}) through
    Triton's own launch path, minus the launch."""
    # Triton's cache is keyed by the source text, not its path: a kernel cached from another checkout of the same
    # code, or from before its file moved, would bring those file names in its line info. So one cache per checkout
    # and kernel file.
    folder = os.path.dirname(launch.fn.fn.__code__.co_filename)
    tag = hashlib.sha1(" ".join([ROOT, folder, *sorted(os.listdir(folder))]).encode()).hexdigest()[:12]
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"aot_check-triton-{tag}"))
    saved, fn = driver._active, launch.fn
    driver.set_active(_driver(arch))
    try:
        kernel = fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
        binder = fn.device_caches[("aot", arch)][-1]
        bound, spec, _ = binder(*launch.args, **launch.kwargs)
    finally:
        driver._active = saved
    return kernel, bound, {p.name: s for p, s in zip(fn.params, spec)}


def _tool(name: str, arch: int = 0) -> str:
    """Triton's own ptxas for the arch (3.9 uses its `ptxas-blackwell` for sm_90), else the bundled tool."""
    if name == "ptxas":
        with contextlib.suppress(ImportError, AttributeError, TypeError):
            from triton.backends.nvidia.compiler import get_ptxas  # Triton 3.9's API; 3.6 has none

            return get_ptxas(arch).path
    for path in (os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name),
                 shutil.which(name) or "", f"/usr/local/cuda/bin/{name}"):
        if path and os.path.exists(path):
            return path
    raise SystemExit(f"aot_check: {name} not found (Triton's NVIDIA backend bundles it)")


def _run_tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(name), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    out = _run_tool("cuobjdump", cubin, "--dump-resource-usage")
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(found.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def ptxas_report(kernel, arch: int) -> dict:
    """ptxas -v on the kernel's PTX with Triton's flags: stack frame and spill store / load bytes, and whether that
    assembly used as many registers as the kernel's cubin (so the report is the kernel's). Empty if it fails."""
    flags = ["-lineinfo", "-v", f"--gpu-name={nv.sm_arch_from_capability(arch)}"]
    flags += ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(nv.CUDABackend.make_cubin) else []
    flags += [] if getattr(kernel.metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(kernel.asm["ptx"])
        proc = subprocess.run([_tool("ptxas", arch), *flags, f.name, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s.*Used (\d+) registers",
                  proc.stdout + proc.stderr, re.S)
    return dict(zip(("frame", "spill_st", "spill_ld", "regs"), map(int, m.groups()))) if m and not proc.returncode \
        else {}


# ------------------------------------------------------------------------------------------------------- analysis

def _flat(x) -> list:
    return [y for e in x for y in _flat(e)] if isinstance(x, (tuple, list)) else [x]


def _used_pointers(ttir: str, bound: dict, spec: dict) -> list[Arg]:
    """Tensors the kernel dereferences: the TTIR body names their argument (all of them if the header names none).
    A tuple parameter's leaves that are not constexpr are its arguments, in order, each with the parameter's name
    as its location (`ZS.0`, ... in 3.9; `ZS` four times in 3.6)."""
    header, _, body = ttir.partition("tt.func public")[2].partition("\n")
    ssa: dict[str, list[str]] = {}
    for name, loc in re.findall(r"%([\w.]+):.*?loc\(\"([^\"]+)\"", header):
        ssa.setdefault(loc.split(".")[0], []).append(name)
    used = []
    for k, v in bound.items():
        leaves = [a for a, t in zip(_flat(v), _flat(spec[k][0])) if t != "constexpr"]
        names = ssa.get(k, [None] * len(leaves)) if ssa else [None] * len(leaves)
        used += [a for a, n in zip(leaves, names) if isinstance(a, Arg) and (
            n is None or re.search(rf"%{re.escape(n)}(?![\w.])", body))]
    return used


def analyse(launch: Launch, arch: int, src: aot_source.Source) -> dict:
    kernel, bound, spec = compile_launch(launch, arch)
    cubin = kernel.asm["cubin"]
    # the kernel module's numbers, tl.constexpr ones unwrapped (mode constants compared with constexpr arguments)
    glob = {k: v.value if isinstance(v, tl.constexpr) else v for k, v in launch.fn.fn.__globals__.items()}
    glob = {k: v for k, v in glob.items() if isinstance(v, (int, float)) and k[:1] != "_"}
    values = {k: v for k, v in bound.items() if isinstance(v, (int, float))}
    consts = {k: s[1] for k, s in spec.items() if s[0] == "constexpr"}
    programs = math.prod(launch.grid)
    env = aot_source.Env((launch.fn.fn.__code__.co_filename, launch.fn.fn.__name__),
                       {**glob, **values, aot_source.GRID: tuple(launch.grid) + (1, 1)}, {**glob, **consts}, glob,
                       programs)
    sass = _run_tool("nvdisasm", cubin, "-c", "-gi")
    dyn = aot_sass.count(sass, env, src)
    res, px = resources(cubin), ptxas_report(kernel, arch)
    notes = dyn["notes"] + ([] if px.get("regs") == res["reg"] else
                            [f"ptxas -v unavailable or not the kernel's assembly ({px or 'failed'})"])
    static = Counter(i.op.split(".")[0] for i in aot_sass.parse_sass(sass))
    return dict(kernel=launch.fn.fn.__name__, phase=launch.phase, grid=programs, warps=kernel.metadata.num_warps,
                **res, ptxas=px if px.get("regs") == res["reg"] else {}, stl_ldl=static["STL"] + static["LDL"],
                spec={k: s[0] if s[0] == "constexpr" else ",".join(f"{t}{'/16' if a == 'D' else ''}"
                                                                  for t, a in zip(_flat(s[0]), _flat(s[1])))
                      for k, s in spec.items()},
                ints={k: v for k, v in values.items() if not isinstance(v, bool)},
                static=dyn["static"], per_thread=dyn["per_thread"], ops=dict(dyn["ops"]), notes=notes,
                loops=[dict(where=lp.where, trip=lp.trip, body=lp.body, counted=lp.counted) for lp in dyn["loops"]],
                spans=[a.span for a in _used_pointers(kernel.asm["ttir"], bound, spec)])


def _union(spans: list) -> int:
    total, hi = 0, -1
    for a, b in sorted(spans):
        total += max(0, b - max(a, hi))
        hi = max(hi, b)
    return total


def summarize(kernels: list[dict], shape: tuple, hw: dict, teacher_logits: bool = False) -> dict:
    """Per pass: the issue, MUFU and DRAM times of the model (module docstring) and the per-element counts."""
    E, B, C = shape
    E += teacher_logits  # an external teacher's logits are read like an exit's
    clock, out = hw["clock_ghz"] * 1e9, {}
    for phase in ("forward", "backward"):
        ks = [k for k in kernels if k["phase"] == phase]
        threads = [k["grid"] * k["warps"] * 32 for k in ks]
        instr = sum(k["per_thread"] * t for k, t in zip(ks, threads))
        mufu = sum((Counter({op: n * t for op, n in k["ops"].items() if op[:4] == "MUFU"})
                    for k, t in zip(ks, threads)), Counter())
        lmem = sum((k["ops"].get("LDL", 0) + k["ops"].get("STL", 0)) * t for k, t in zip(ks, threads))
        nbytes = _union([s for k in ks for s in k["spans"]])
        issue, sfu = instr / 32 / (hw["sms"] * 4 * clock), sum(mufu.values()) / (hw["sms"] * 16 * clock)
        dram = nbytes / (hw["dram_tbs"] * 1e12)
        main = max(zip(ks, threads), key=lambda kt: kt[0]["per_thread"] * kt[1], default=({}, 0))[0]
        spills = [k["ptxas"]["spill_st"] + k["ptxas"]["spill_ld"] if k["ptxas"] else None for k in ks]
        out[phase] = dict(launches=len(ks), main=main.get("kernel", "-"), regs=main.get("reg", 0),
                          shared=main.get("shared", 0), stack=max((k["stack"] for k in ks), default=0),
                          spill=None if None in spills else max(spills, default=0),
                          stl_ldl=sum(k["stl_ldl"] for k in ks), instr=instr / (E * B * C),
                          mufu=sum(mufu.values()) / (E * B * C), lmem=lmem / (E * B * C),
                          mufu_kinds={op.split(".", 1)[1]: n / (E * B * C) for op, n in sorted(mufu.items())},
                          bytes=nbytes, issue_us=issue * 1e6, mufu_us=sfu * 1e6, dram_us=dram * 1e6,
                          issue_le_dram=issue <= dram)
    return out


def run(arch: int, quick: bool, hw: dict) -> dict:
    src, variants, failures = aot_source.Source(), [], 0
    for label, shape, D, dtype, options in QUICK if quick else FULL:
        name = f"{label} E={shape[0]} B={shape[1]} C={shape[2]} {dtype}" + (f" D={D}" if D else "")
        kernels = []
        try:
            launches = capture(shape, D, dtype, options)
        except Exception as exc:  # e.g. a launcher that refuses CPU tensors outside the interpreter
            failures, launches = failures + 1, []
            print(f"FAIL capture {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
        for launch in launches:
            try:
                kernels.append(k := analyse(launch, arch, src))
                print(f"ok   {k['phase'][:3]} {k['kernel']} grid={k['grid']} warps={k['warps']} regs={k['reg']} {name}")
            except Exception as exc:  # report every launch, then fail
                failures += 1
                print(f"FAIL {launch.phase[:3]} {launch.fn.fn.__name__} {name}: {type(exc).__name__}: "
                      f"{str(exc)[:2000]}", flush=True)
        variants.append(dict(name=name, shape=shape, dtype=dtype, options=options, kernels=kernels,
                             passes=summarize(kernels, shape, hw, options.get("teacher") == "logits")))
    version = subprocess.run([_tool("ptxas", arch), "--version"], capture_output=True, text=True).stdout
    return dict(triton=triton.__version__, ptxas=(re.findall(r"release (.*)", version) or ["?"])[-1], arch=arch, hw=hw,
                variants=variants, failures=failures)


# ------------------------------------------------------------------------------------------------------- output

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100), 90 (H100/H200)")
    p.add_argument("--quick", action="store_true", help="only the headline and the large BYOT shapes")
    p.add_argument("--md", help="also write the tables as markdown to this file")
    p.add_argument("--json", help="write the raw results as JSON to this file")
    p.add_argument("--python", action="append", default=[],
                   help="also run under this interpreter (e.g. a venv with another Triton); repeatable")
    for name, default in (("--sms", 132), ("--clock-ghz", 1.98), ("--dram-tbs", 4.3)):  # copy bandwidth, r + w, TB/s
        p.add_argument(name, type=type(default), default=default)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("aot_check: run with TRITON_INTERPRET=0: under the interpreter nothing is compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences Triton 3.9's notice
    hw = dict(sms=a.sms, clock_ghz=a.clock_ghz, dram_tbs=a.dram_tbs)
    results = [run(a.arch, a.quick, hw)]
    same = [f"--arch={a.arch}", f"--sms={a.sms}", f"--clock-ghz={a.clock_ghz}", f"--dram-tbs={a.dram_tbs}"]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for py in a.python:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            proc = subprocess.run([py, "-m", "kernels.aot.check", *same, *(["--quick"] if a.quick else []), "--json",
                                   f.name], env=env, text=True)
            if proc.returncode not in (0, 1):
                raise SystemExit(f"aot_check: {py} failed with exit status {proc.returncode}")
            results.append(json.load(open(f.name)))
    if a.json:  # the machine form (and how --python runs the other interpreters)
        with open(a.json, "w") as f:
            json.dump(results[0], f)
    else:
        print(render(results))
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(results, argv, hw, __doc__))
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
