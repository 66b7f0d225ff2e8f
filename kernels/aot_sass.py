"""Dynamic SASS instruction counts of one compiled Triton kernel at one launch (used by kernels/aot_check.py).

Input: `nvdisasm -c -gi` text (line info through inlined calls) and the launch's values (constexprs, integers).
    loops   every backward branch (a branch to itself is the trap after the final EXIT and ends the code); its
            source loop is the innermost `for` holding most of its instructions, and its trip is len(range(...))
            of that `for`, evaluated from the launch values through the helpers' call sites and their simple
            top-level assignments (a `for` inside an inlined helper gets the helper's parameters)
    count   straight-line instructions once + each loop's body x its trip x the enclosing loops' trips. When a
            runtime (not constexpr) if/else has loops on both sides, only the costlier side counts (upper bound).
            A loop whose trip cannot be evaluated counts once and is flagged.
All counts are per thread (= per warp: every instruction issues once per warp, predicated or not).
"""
from __future__ import annotations

import ast
import contextlib
import operator
import os
import re
from collections import Counter
from dataclasses import dataclass


@dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. MUFU.EX2
    target: object  # branch target address, -1 if unresolved, None if not a branch
    chain: tuple  # ((file, line), ...) innermost first, through inlined calls


_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> list[Instr]:
    out, labels, pending, chain, in_group = [], {}, [], (), False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("//##"):  # one comment line per inlining level; a new group replaces the old chain
            pairs = tuple((f, int(n)) for f, n in re.findall(r'File "([^"]+)", line (\d+)', s))
            chain = tuple(dict.fromkeys((chain if in_group else ()) + pairs))
            in_group = True
        elif re.match(r"\.L_x_\d+:", s):
            pending.append(s[:-1])
        elif m := _INSTR.search(s):
            addr = int(m.group(1), 16)
            labels.update((label, addr) for label in pending)
            pending, in_group = [], False
            tgt = re.search(r"`\((\.L_x_\d+)\)", m.group(3))
            out.append(Instr(addr, m.group(2), tgt.group(1) if tgt else None, chain))
    for ins in out:
        ins.target = None if ins.target is None else labels.get(ins.target, -1)
    end = next((i.addr for i in out if i.op == "BRA" and i.target == i.addr), None)
    return [i for i in out if end is None or i.addr < end]


def find_loops(code: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) address of each loop: a branch back to an earlier address."""
    return [(i.target, i.addr) for i in code if i.op.startswith("BRA") and i.target is not None
            and 0 <= i.target < i.addr]


# ------------------------------------------------------------------------------------------ source evaluation

class Unknown(Exception):
    """The expression depends on a runtime value (a load, a program id, ...)."""


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.Div: operator.truediv, ast.Pow: operator.pow, ast.LShift: operator.lshift,
        ast.RShift: operator.rshift, ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.Eq: operator.eq,
        ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.USub: operator.neg, ast.Not: operator.not_, ast.UAdd: operator.pos}
_CALLS = {"cdiv": lambda a, b: -(-a // b), "min": min, "max": max, "minimum": min, "maximum": max,
          "next_power_of_2": lambda n: 1 << (n - 1).bit_length()}


def evaluate(node, ns: dict):
    try:
        return _eval(node, ns)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise Unknown(str(exc)) from exc


def _eval(node, ns: dict):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in ns:
            raise Unknown(node.id)
        return ns[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, ns), _eval(node.right, ns))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand, ns))
    if isinstance(node, ast.BoolOp):
        vals = [_eval(v, ns) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    if isinstance(node, ast.Compare):
        left, ok = _eval(node.left, ns), True
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, ns)
            if type(op) not in _OPS:
                raise Unknown(type(op).__name__)
            ok, left = ok and _OPS[type(op)](left, right), right
        return ok
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, ns) else node.orelse, ns)
    if isinstance(node, ast.Call) and not node.keywords:
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if name in _CALLS:
            return _CALLS[name](*(_eval(a, ns) for a in node.args))
    raise Unknown(type(node).__name__)


def _name(call) -> str:
    return getattr(call.func, "attr", getattr(call.func, "id", ""))


class Source:
    """The Python files behind the line info: functions, `for` loops and `if`s, parsed once."""

    def __init__(self):
        self.trees: dict[str, list] = {}

    def nodes(self, file: str, kind) -> list:
        if file not in self.trees:
            try:
                with open(file) as f:
                    self.trees[file] = list(ast.walk(ast.parse(f.read())))
            except (OSError, SyntaxError, ValueError):
                self.trees[file] = []
        return [n for n in self.trees[file] if isinstance(n, kind)]

    def func_at(self, file: str, line: int):
        funcs = [f for f in self.nodes(file, ast.FunctionDef) if f.lineno <= line <= f.end_lineno]
        return min(funcs, key=lambda f: f.end_lineno - f.lineno, default=None)

    def frames(self, chain: tuple, kernel_ns: dict, globals_ns: dict) -> list:
        """[(function, namespace)] from the kernel (chain[-1]) inward to chain[0]: a helper's parameters come from
        its call site in the frame outside it, then its top-level assignments before the line run in order."""
        out = []
        for depth in range(len(chain) - 1, -1, -1):
            file, line = chain[depth]
            fn = self.func_at(file, line)
            if fn is None:
                break
            ns = dict(kernel_ns) if not out else self._bind(fn, out[-1], chain[depth + 1][1], globals_ns)
            for st in fn.body:
                if st.lineno >= line:
                    break
                targets = [t.id for t in ast.walk(st) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)]
                simple = isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)
                for t in targets:
                    ns.pop(t, None)
                if simple:
                    with contextlib.suppress(Unknown):
                        ns[targets[0]] = evaluate(st.value, ns)
            out.append((fn, ns))
        return out

    @staticmethod
    def _bind(callee, caller_frame, call_line: int, globals_ns: dict) -> dict:
        caller, caller_ns = caller_frame
        ns = dict(globals_ns)
        params = [a.arg for a in callee.args.args]
        for name, default in zip(params[len(params) - len(callee.args.defaults):], callee.args.defaults):
            with contextlib.suppress(Unknown):
                ns[name] = evaluate(default, {})
        calls = [c for c in ast.walk(caller) if isinstance(c, ast.Call) and _name(c) == callee.name
                 and c.lineno <= call_line <= c.end_lineno]
        if calls:
            for name, expr in list(zip(params, calls[0].args)) + [(k.arg, k.value) for k in calls[0].keywords]:
                ns.pop(name, None)
                with contextlib.suppress(Unknown):
                    ns[name] = evaluate(expr, caller_ns)
        return ns

    def call_paths(self, file: str, kernel, target, const_ns: dict, globals_ns: dict) -> list[list[int]]:
        """Call lines (innermost first) of every path from `kernel` to `target` through live code: a call under an
        if whose constexpr test is false leaves no code."""
        paths, funcs = [], {f.name: f for f in self.nodes(file, ast.FunctionDef)}

        def live_calls(stmts, ns):
            for st in stmts:
                if isinstance(st, ast.If):
                    try:
                        taken = (st.body,) if evaluate(st.test, ns) else (st.orelse,)
                    except Unknown:
                        taken = (st.body, st.orelse)
                    for block in taken:
                        yield from live_calls(block, ns)
                elif isinstance(st, (ast.For, ast.While, ast.With)):
                    yield from live_calls(st.body + getattr(st, "orelse", []), ns)
                else:
                    yield from (c for c in ast.walk(st) if isinstance(c, ast.Call))

        def walk(fn, ns, lines):
            if fn is target:
                paths.append(lines)
                return
            for call in live_calls(fn.body, ns):
                callee = funcs.get(_name(call))
                if callee is not None and callee is not fn and len(lines) < 16:
                    walk(callee, self._bind(callee, (fn, ns), call.lineno, globals_ns), [call.lineno] + lines)

        walk(kernel, dict(const_ns), [])
        return paths


# ------------------------------------------------------------------------------------------ the dynamic count

@dataclass
class Loop:
    first: int
    last: int
    where: str = "?"  # file:line of its source `for`, '?' when unmapped
    trip: object = None  # int, or None when it cannot be evaluated
    body: int = 0  # static instructions in it (nested loops included)
    branch: tuple = ()  # ((file, if line, 'then'|'else'), ...) runtime ifs around it
    counted: bool = True
    site: tuple = ()  # the `for` and the call sites leading to it: one per source loop instance
    copies: int = 1  # SASS copies expected from enclosing tl.static_range loops (0: unknown)


@dataclass
class Env:
    """The launch as the source sees it: the kernel's (file, function name), every launch value (constexprs and
    runtime scalars: loop bounds), the constexprs alone (what the compiler could fold), the module's constants."""
    kernel: tuple
    values: dict
    consts: dict
    globals: dict


def _trip(node, ns: dict):
    it = node.iter  # range / tl.range (its keywords only tune the schedule); static_range leaves no SASS loop
    if not (isinstance(it, ast.Call) and _name(it) == "range"):
        return None
    try:
        args = [evaluate(a, ns) for a in it.args]
        return len(range(*args))
    except Unknown:
        return None


def _map(loop: Loop, body: list[Instr], src: Source, env: Env) -> list[str]:
    import triton

    best, skip = None, os.path.dirname(triton.__file__)  # Triton's own helpers (tl.sum, ...) hold no kernel loop
    for file in {f for ins in body for f, _ in ins.chain if not f.startswith(skip)}:
        for node in src.nodes(file, ast.For):
            n = sum(any(f == file and node.lineno <= ln <= node.end_lineno for f, ln in i.chain) for i in body)
            key = (n, node.lineno - node.end_lineno)  # most instructions, then the innermost
            if n and (best is None or key > best[0]):
                best = (key, file, node)
    if best is None:
        return []
    _, file, node = best
    ins = next(i for i in body if any(f == file and node.lineno <= ln <= node.end_lineno for f, ln in i.chain))
    k = next(j for j, (f, ln) in enumerate(ins.chain) if f == file and node.lineno <= ln <= node.end_lineno)
    chain, notes = ((file, node.lineno),) + ins.chain[k + 1:], []
    kernel = next((f for f in src.nodes(env.kernel[0], ast.FunctionDef) if f.name == env.kernel[1]), None)
    outer = src.func_at(*chain[-1])
    if kernel is not None and outer is not kernel and chain[-1][0] == env.kernel[0]:
        # line info without inlining records (Triton 3.6): the call path comes from the source's live calls
        paths = src.call_paths(env.kernel[0], kernel, outer, env.consts, env.globals)
        chain += tuple((env.kernel[0], ln) for ln in (paths[0] if paths else ()))
        if len(paths) > 1:
            notes.append(f"loop at {os.path.basename(file)}:{node.lineno}: {len(paths)} live call paths, took the "
                         "first")
    loop.where, loop.site = f"{os.path.basename(file)}:{node.lineno}", chain
    frames = src.frames(chain, env.values, env.globals)
    if frames and frames[-1][0] is src.func_at(file, node.lineno):
        loop.trip = _trip(node, frames[-1][1])
    # runtime ifs around the loop: in each frame, the ifs holding the loop (or the call that leads to it)
    branch = []
    for (fn, ns), (f, ln) in zip(src.frames(chain, env.consts, env.globals), reversed(chain)):
        for st in (n for n in ast.walk(fn) if isinstance(n, ast.For) and n is not node):
            if _name(st.iter) == "static_range" and st.body[0].lineno <= ln <= st.body[-1].end_lineno:
                try:  # unrolled by the front end: one SASS copy of this loop per iteration
                    loop.copies *= len(range(*(evaluate(a, ns) for a in st.iter.args)))
                except Unknown:
                    loop.copies = 0
        for st in (n for n in ast.walk(fn) if isinstance(n, ast.If)):
            side = next((s for s, blk in (("then", st.body), ("else", st.orelse))
                         if blk and blk[0].lineno <= ln <= blk[-1].end_lineno), None)
            if side:
                try:
                    evaluate(st.test, ns)  # a constexpr test: the compiler already kept one side
                except Unknown:
                    branch.append((f, st.lineno, side))
    loop.branch = tuple(branch)
    return notes


def count(sass_text: str, env: Env, src: Source | None = None) -> dict:
    """{'static', 'per_thread', 'ops' (Counter of dynamic counts per opcode family: MUFU.EX2, LDL, ...),
    'loops' [Loop], 'notes' [str]} for one kernel at one launch."""
    src = src or Source()
    code = parse_sass(sass_text)
    loops, notes = [Loop(a, b) for a, b in find_loops(code)], []
    for lp in loops:
        body = [i for i in code if lp.first <= i.addr <= lp.last]
        lp.body = len(body)
        notes += _map(lp, body, src, env)
    mult = {i.addr: 1 for i in code}
    for lp in loops:
        for i in code:
            if lp.first <= i.addr <= lp.last:
                mult[i.addr] *= lp.trip if lp.trip is not None else 1
    notes += [f"loop at {lp.where}: trip unknown, counted once" for lp in loops if lp.trip is None]
    twins = Counter(lp.site for lp in loops if lp.site)
    expected = {lp.site: lp.copies for lp in loops}
    notes += [f"the loop at {os.path.basename(site[0][0])}:{site[0][1]} became {n} SASS loops (unrolled or "
              "pipelined?): each counted at the full trip, an upper bound"
              for site, n in twins.items() if n > 1 and expected[site] and n > expected[site]]
    sides: dict[tuple, dict[str, list[Loop]]] = {}
    for lp in loops:
        for f, line, side in lp.branch:
            sides.setdefault((f, line), {}).setdefault(side, []).append(lp)
    for (f, line), by_side in sides.items():
        if len(by_side) == 2:
            cost = {s: sum(mult[i.addr] for i in code if any(lp.first <= i.addr <= lp.last for lp in lps))
                    for s, lps in by_side.items()}
            keep = max(cost, key=cost.get)
            for lp in by_side["else" if keep == "then" else "then"]:
                lp.counted = False
            notes.append(f"runtime if at {os.path.basename(f)}:{line}: counted its {keep} side "
                         f"({cost[keep]} instr/thread), not the other ({min(cost.values())})")
    ops: Counter = Counter()
    for i in code:
        if all(lp.counted or not lp.first <= i.addr <= lp.last for lp in loops):
            family = i.op if i.op.startswith("MUFU") else i.op.split(".")[0]
            ops[family] += mult[i.addr]
    return dict(static=len(code), per_thread=sum(ops.values()), ops=ops, loops=loops, notes=notes)
