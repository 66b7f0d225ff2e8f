"""Compile the fused loss's kernels for a GPU on a machine without one, exactly as a launch would, and predict speed.

    TRITON_INTERPRET=0 python -m kernels.aot_check [--arch 90] [--quick] [--md FILE] [--python PY ...]
                                                   [--sms 132] [--clock-ghz 1.98] [--dram-tbs 4.3]

Capture: the public launcher (kernels.multi_exit_loss.multi_exit_loss) runs forward and the backward of the losses'
sum on CPU tensors of the real shapes (allocated, not filled), with Triton's launch intercepted, so every kernel it
launches is recorded with its arguments, grid and options (an autotuned kernel with its first config); nothing here
knows the kernels' names or argument lists. Each launch is then compiled through Triton's own
JITFunction.run(warmup=True) behind a stand-in driver for GPUTarget("cuda", arch, 32): divisibility-by-16 and ==1
integer specialization, pointer alignment (torch CPU data is 64-byte aligned, like CUDA's) and constexprs follow the
installed Triton's rules, as on a GPU. --python runs the same under other interpreters (e.g. a venv with the GPU
machine's Triton) and merges the tables. The launcher's device guard (a `*check_device*` function of its module) is
bypassed while capturing, since it admits CPU tensors only under the interpreter.

Per kernel: registers, stack and local bytes (spills; cuobjdump), shared memory, and a dynamic count from the SASS
(nvdisasm with line info), per thread:
    loops       every backward branch; its source loop is the innermost `for` that holds most of its instructions
                (line info, through inlined helpers); trip = len(range(...)) of that `for` at the launch, evaluated
                from the captured constexprs and integers (through the helpers' call sites and simple assignments)
    count       straight-line instructions once + each loop's body x its trip (x the enclosing loops' trips). A
                runtime (not constexpr) if/else with loops on both sides counts only its costlier side (upper
                bound); a loop whose trip cannot be evaluated counts once and is flagged '?'
    per element thread count x threads launched / (E * B * C) logit elements; MUFU.* the same way
Pass model, per pass (forward, backward), defaults for an H200:
    issue = warp instructions / (SMs x 4 schedulers x clock)
    MUFU  = MUFU ops / (SMs x 16 per clock x clock)
    DRAM  = bytes / measured copy bandwidth (read + written); bytes = every distinct tensor a pass's kernels
            dereference (TTIR), counted once: re-reads are assumed to hit L2
    Only Triton launches count: torch ops around them (zero-fills, copies) are in none of these figures.
Targets (at C=32000, bf16): 0 spills, <= 2.5 MUFU per logit element over forward + backward, issue <= DRAM per pass.
Exit status 1 if any launch fails to compile.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

from kernels import aot_sass

BYOT = dict(teacher="deepest", ce_weight=0.9, kd_weight=0.1, hint_weight=1e-6, temperature=3.0, kd="kl",
            t_squared=True)
KD = dict(teacher="logits", ce_weight=0.5, kd_weight=0.5, temperature=4.0, t_squared=True)
HEADLINE, LARGE = (4, 256, 1000), (4, 4096, 32000)
# (label, (E, B, C), feature dim D, dtype, launcher keyword options)
QUICK = [("byot+sse", HEADLINE, 512, "bf16", dict(BYOT, hint="sse")),
         ("byot+sse", LARGE, 512, "bf16", dict(BYOT, hint="sse"))]
FULL = QUICK + [
    ("byot+sse recompute", LARGE, 512, "bf16", dict(BYOT, hint="sse", recompute_grad=True)),
    ("byot+sse", LARGE, 512, "fp32", dict(BYOT, hint="sse")),
    ("byot+sse", LARGE, 512, "fp16", dict(BYOT, hint="sse")),
    ("kd logits-teacher", LARGE, 0, "bf16", KD),
    ("byot+sse recompute", HEADLINE, 512, "bf16", dict(BYOT, hint="sse", recompute_grad=True)),
    ("byot+sse", HEADLINE, 512, "fp32", dict(BYOT, hint="sse")),
    ("byot+sse", HEADLINE, 512, "fp16", dict(BYOT, hint="sse")),
    ("byot+l2", HEADLINE, 512, "bf16", dict(BYOT, hint="l2")),
    ("byot+mse", HEADLINE, 512, "bf16", dict(BYOT, hint="mse")),
    ("byot T=1 soft_ce", HEADLINE, 0, "bf16", dict(BYOT, temperature=1.0, kd="soft_ce")),
    ("kd logits-teacher", HEADLINE, 0, "bf16", KD),
    ("closed-form (beta)", HEADLINE, 0, "bf16", dict(teacher="closed_form", ce_weight=0.5, kd_weight=0.5)),
    ("none + smoothing", HEADLINE, 0, "bf16", dict(teacher="none", label_smoothing=0.1)),
]
TARGETS = dict(spill_bytes=0, mufu_per_elem=2.5)


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


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    phase: str


@contextlib.contextmanager
def intercept(launches: list, phase: list):
    """Record instead of launch: JITFunction.run (an autotuned kernel with its first config: which one wins is only
    known on a GPU), plus the launcher's device guard, which refuses CPU tensors outside the interpreter."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import kernels.multi_exit_loss as launcher

    def record(self, *args, grid, warmup=False, **kwargs):
        args = tuple(Arg(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: Arg(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        if callable(grid):
            bound = self.signature.bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                           if k in self.signature.parameters})
            bound.apply_defaults()
            grid = grid(dict(bound.arguments))
        launches.append(Launch(self, args, kwargs, tuple(grid), phase[0]))

    def first_config(self, *args, **kwargs):
        self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())

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
    import torch

    from kernels.multi_exit_loss import multi_exit_loss

    E, B, C = shape
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    leaf = dict(dtype=dt, requires_grad=True)
    z = [torch.empty(B, C, **leaf) for _ in range(E)]
    feats = [torch.empty(B, D, **leaf) for _ in range(E)] if D else []
    extra = dict(features=feats or None)
    if options.get("teacher") == "logits":
        extra["teacher_logits"] = torch.empty(B, C, dtype=dt)
    if options.get("teacher") == "closed_form":
        extra["soft_b"] = torch.full((B,), 0.9)
    launches, phase = [], ["forward"]
    with intercept(launches, phase):
        out = multi_exit_loss(z, torch.zeros(B, dtype=torch.long), **extra, **options)
        phase[0] = "backward"
        # autograd.grad, not backward(): accumulating into .grad could copy (and so touch) gigabytes on the CPU
        torch.autograd.grad(out.sum(), z + feats, allow_unused=True)
    return launches


# ------------------------------------------------------------------------------------------------------- compile

class _Driver:
    """Stands in for the CUDA driver: a warm-up compile asks it only for the target, a device key and a stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return ("aot", self.arch)  # the JITFunction's binder cache is per device: one per target here

    def get_current_stream(self, device=None):
        return 0


def compile_launch(launch: Launch, arch: int):
    """(CompiledKernel, bound arguments, {parameter: (type or 'constexpr', specialization or value)}) through
    Triton's own launch path, minus the launch."""
    from triton.runtime import driver

    saved, fn = driver._active, launch.fn
    driver.set_active(_Driver(arch))
    try:
        kernel = fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
        binder = fn.device_caches[("aot", arch)][-1]
        bound, spec, _ = binder(*launch.args, **launch.kwargs)
    finally:
        driver._active = saved
    return kernel, bound, {p.name: s for p, s in zip(fn.params, spec)}


def _tool(name: str) -> str:
    import triton

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


def _version(tool: str) -> str:
    out = subprocess.run([_tool(tool), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return next((ln.split("release")[-1].strip() for ln in out if "release" in ln), "?")


# ------------------------------------------------------------------------------------------------------- analysis

def _used_pointers(ttir: str, bound: dict) -> list[str]:
    """Tensor arguments the kernel dereferences: named in the TTIR body (all of them if the TTIR names none)."""
    header, _, body = ttir.partition("tt.func public")[2].partition("\n")
    tensors = [k for k, v in bound.items() if isinstance(v, Arg)]
    if not any(f"%{k}:" in header for k in tensors):
        return tensors
    return [k for k in tensors if re.search(rf"%{re.escape(k)}\b", body)]


def analyse(launch: Launch, arch: int, src: aot_sass.Source) -> dict:
    kernel, bound, spec = compile_launch(launch, arch)
    cubin = kernel.asm["cubin"]
    glob = {k: v for k, v in launch.fn.fn.__globals__.items() if isinstance(v, (int, float)) and not k.startswith("_")}
    values = {k: v for k, v in bound.items() if isinstance(v, (int, float))}
    consts = {k: s[1] for k, s in spec.items() if s[0] == "constexpr"}
    env = aot_sass.Env((launch.fn.fn.__code__.co_filename, launch.fn.fn.__name__), {**glob, **values},
                       {**glob, **consts}, glob)
    dyn = aot_sass.count(_run_tool("nvdisasm", cubin, "-c", "-gi"), env, src)
    warps, programs = kernel.metadata.num_warps, 1
    for g in launch.grid:
        programs *= g
    used = _used_pointers(kernel.asm["ttir"], bound)
    return dict(kernel=launch.fn.fn.__name__, phase=launch.phase, grid=programs, warps=warps, **resources(cubin),
                spec={k: s[0] if s[0] == "constexpr" else f"{s[0]}{'/16' if s[1] == 'D' else ''}"
                      for k, s in spec.items()},
                ints={k: v for k, v in values.items() if not isinstance(v, bool)},
                static=dyn["static"], per_thread=dyn["per_thread"], ops=dict(dyn["ops"]), notes=dyn["notes"],
                loops=[dict(where=lp.where, trip=lp.trip, body=lp.body, counted=lp.counted) for lp in dyn["loops"]],
                spans=[bound[k].span for k in used])


def _union(spans: list) -> int:
    total, hi = 0, -1
    for a, b in sorted(spans):
        total += max(0, b - max(a, hi))
        hi = max(hi, b)
    return total


def summarize(kernels: list[dict], shape: tuple, hw: dict) -> dict:
    """Per pass: the issue, MUFU and DRAM times of the model (module docstring) and the per-element counts."""
    E, B, C = shape
    clock, out = hw["clock_ghz"] * 1e9, {}
    for phase in ("forward", "backward"):
        ks = [k for k in kernels if k["phase"] == phase]
        threads = [k["grid"] * k["warps"] * 32 for k in ks]
        instr = sum(k["per_thread"] * t for k, t in zip(ks, threads))
        mufu = Counter()
        for k, t in zip(ks, threads):
            mufu.update({op: n * t for op, n in k["ops"].items() if op.startswith("MUFU")})
        lmem = sum((k["ops"].get("LDL", 0) + k["ops"].get("STL", 0)) * t for k, t in zip(ks, threads))
        nbytes = _union([s for k in ks for s in k["spans"]])
        issue, sfu = instr / 32 / (hw["sms"] * 4 * clock), sum(mufu.values()) / (hw["sms"] * 16 * clock)
        dram = nbytes / (hw["dram_tbs"] * 1e12)
        main = max(zip(ks, threads), key=lambda kt: kt[0]["per_thread"] * kt[1], default=({}, 0))[0]
        out[phase] = dict(launches=len(ks), main=main.get("kernel", "-"), regs=main.get("reg", 0),
                          shared=main.get("shared", 0), spill=max((k["stack"] + k["local"] for k in ks), default=0),
                          instr=instr / (E * B * C),
                          mufu=sum(mufu.values()) / (E * B * C), lmem=lmem / (E * B * C),
                          mufu_kinds={op.split(".", 1)[1]: n / (E * B * C) for op, n in sorted(mufu.items())},
                          bytes=nbytes, issue_us=issue * 1e6, mufu_us=sfu * 1e6, dram_us=dram * 1e6,
                          issue_le_dram=issue <= dram)
    return out


def run(arch: int, quick: bool, hw: dict) -> dict:
    import triton

    src, variants, failures = aot_sass.Source(), [], 0
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
                kernels.append(analyse(launch, arch, src))
                k = kernels[-1]
                print(f"ok   {launch.phase[:3]} {k['kernel']} grid={k['grid']} warps={k['warps']} regs={k['reg']} "
                      f"stack={k['stack']} {name}", flush=True)
            except Exception as exc:  # report every launch, then fail
                failures += 1
                print(f"FAIL {launch.phase[:3]} {launch.fn.fn.__name__} {name}: {type(exc).__name__}: "
                      f"{str(exc)[:2000]}", flush=True)
        variants.append(dict(name=name, shape=shape, dtype=dtype, options=options, kernels=kernels,
                             passes=summarize(kernels, shape, hw)))
    return dict(triton=triton.__version__, ptxas=_version("ptxas"), arch=arch, hw=hw, variants=variants,
                failures=failures)


# ------------------------------------------------------------------------------------------------------- output

def _table(head: list[str], rows: list[list]) -> str:
    fmt = [("|" + "|".join(f" {c} " for c in r) + "|") for r in [head, ["---"] * len(head), *rows]]
    return "\n".join(fmt)


def _g(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _targets(v: dict) -> list[str]:
    if tuple(v["shape"][2:]) != (32000,) or v["dtype"] != "bf16":
        return []
    p = v["passes"]
    spill = max(k["stack"] + k["local"] for k in v["kernels"]) if v["kernels"] else 0
    mufu = p["forward"]["mufu"] + p["backward"]["mufu"]
    ok = {True: "met", False: "MISSED"}
    lines = [f"spills: {spill} B (target 0): {ok[spill <= TARGETS['spill_bytes']]}",
             f"MUFU per logit element, forward + backward: {mufu:.2f} (target <= {TARGETS['mufu_per_elem']}): "
             f"{ok[mufu <= TARGETS['mufu_per_elem']]}"]
    lines += [f"{ph}: issue {_g(p[ph]['issue_us'])} us vs DRAM {_g(p[ph]['dram_us'])} us (target issue <= DRAM): "
              f"{ok[p[ph]['issue_le_dram']]}" for ph in ("forward", "backward")]
    return [f"- {v['name']}: " + "; ".join(lines)]


def _per_elem(k: dict, v: dict) -> float:
    """Threads launched per logit element: turns a per-thread count into a per-element one."""
    E, B, C = v["shape"]
    return k["grid"] * k["warps"] * 32 / (E * B * C)


def render(results: list[dict]) -> str:
    out = []
    for r in results:
        out += [f"## Triton {r['triton']} (ptxas {r['ptxas']}, sm_{r['arch']})", ""]
        rows = [[v["name"], ph[:3], p["launches"], p["main"], p["regs"], p["shared"], p["spill"], _g(p["instr"]),
                 _g(p["mufu"]),
                 " ".join(f"{k} {_g(n)}" for k, n in p["mufu_kinds"].items()), _g(p["lmem"]), _g(p["issue_us"]),
                 _g(p["mufu_us"]), _g(p["dram_us"]), "yes" if p["issue_le_dram"] else "**no**"]
                for v in r["variants"] for ph, p in v["passes"].items()]
        out += [_table(["variant", "pass", "launches", "main kernel", "regs", "smem B", "spill B (any)", "instr/elem",
                        "MUFU/elem", "MUFU kinds /elem", "LDL+STL /elem", "issue us", "MUFU us", "DRAM us",
                        "issue <= DRAM"], rows), ""]
        targets = [t for v in r["variants"] for t in _targets(v)]
        out += ["Targets at C=32000, bf16:", "", *targets, ""] if targets else []
        rows = [[v["name"], k["phase"][:3], k["kernel"], f"{k['grid']} x {k['warps']}w", k["reg"], k["stack"],
                 k["local"], k["shared"], _g(k["per_thread"]), _g(k["per_thread"] * _per_elem(k, v)),
                 _g(sum(n for op, n in k["ops"].items() if op.startswith("MUFU")) * _per_elem(k, v)),
                 "; ".join(f"{lp['where']} {lp['trip'] if lp['trip'] is not None else '?'} x {lp['body']}"
                           + ("" if lp["counted"] else " (not counted)") for lp in k["loops"]) or "-",
                 "; ".join(k["notes"]) or "-"]
                for v in r["variants"] for k in v["kernels"]]
        out += ["Per kernel (loops: source `for`, trip x static body instructions):", "",
                _table(["variant", "pass", "kernel", "grid x warps", "regs", "stack B", "local B", "smem B",
                        "instr/thread", "instr/elem", "MUFU/elem", "loops", "notes"], rows), ""]
    return "\n".join(out)


def _commit() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "kernels"], cwd=here, capture_output=True,
                               text=True).stdout.strip()
        return sha + (" (kernels/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(results: list[dict], argv: list[str], hw: dict) -> str:
    model = __doc__.split("Per kernel:")[1].split("Exit status")[0].rstrip()
    head = [f"# Fused-loss kernels compiled offline: SASS counts and the performance proxy ({datetime.date.today()})",
            "", f"Command: `python -m kernels.aot_check {' '.join(argv)}` at commit {_commit()}. No GPU was used: "
            "every figure below is a compiler output or a prediction of the model, not a measurement.", "",
            f"Model parameters: {hw['sms']} SMs, {hw['clock_ghz']} GHz, {hw['dram_tbs']} TB/s copy bandwidth "
            "(read + written).", "", "```text", "Per kernel:" + model, "```", ""]
    return "\n".join(head) + "\n" + render(results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100), 90 (H100/H200)")
    p.add_argument("--quick", action="store_true", help="only the headline and the large BYOT shapes")
    p.add_argument("--md", help="also write the tables as markdown to this file")
    p.add_argument("--json", help="write the raw results as JSON to this file")
    p.add_argument("--python", action="append", default=[],
                   help="also run under this interpreter (e.g. a venv with another Triton); repeatable")
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--clock-ghz", type=float, default=1.98)
    p.add_argument("--dram-tbs", type=float, default=4.3, help="measured copy bandwidth, read + written, TB/s")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("aot_check: run with TRITON_INTERPRET=0: under the interpreter nothing is compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences Triton 3.9's notice
    hw = dict(sms=a.sms, clock_ghz=a.clock_ghz, dram_tbs=a.dram_tbs)
    results = [run(a.arch, a.quick, hw)]
    same = ["--arch", str(a.arch), "--sms", str(a.sms), "--clock-ghz", str(a.clock_ghz), "--dram-tbs",
            str(a.dram_tbs)] + (["--quick"] if a.quick else [])
    for py in a.python:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            env = dict(os.environ, TRITON_INTERPRET="0",
                       PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.run([py, "-m", "kernels.aot_check", *same, "--json", f.name], env=env, text=True)
            if proc.returncode not in (0, 1):
                raise SystemExit(f"aot_check: {py} failed with exit status {proc.returncode}")
            results.append(json.load(open(f.name)))
    if not a.json:  # --json is the machine form (and how --python runs the other interpreters)
        print(render(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results[0], f)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(results, argv, hw))
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
