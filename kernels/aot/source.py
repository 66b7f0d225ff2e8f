"""Evaluation of the kernels' Python source at one launch, for kernels/aot/sass.py: the values of a function's
locals from the launch values, the call paths from a kernel to a helper (its own file or a sibling module), and
how often the code under an `if` runs (the rules are in aot_sass's docstring).
"""
from __future__ import annotations

import ast
import contextlib
import operator
import os
from dataclasses import dataclass


class Unknown(Exception):
    """The expression depends on a runtime value (a load, a program id, ...)."""


GRID = "%grid"  # the launch grid in a namespace (not a Python name, so no local can shadow it)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.Div: operator.truediv, ast.Pow: operator.pow, ast.LShift: operator.lshift,
        ast.RShift: operator.rshift, ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.Eq: operator.eq,
        ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.USub: operator.neg, ast.Not: operator.not_, ast.UAdd: operator.pos}
_CALLS = {"cdiv": lambda a, b: -(-a // b), "min": min, "max": max, "minimum": min, "maximum": max,
          "next_power_of_2": lambda n: 1 << (n - 1).bit_length()}
_HINTS = ("multiple_of", "max_contiguous", "max_constancy")  # compiler hints: the value is their first argument


def evaluate(node, ns: dict):
    try:
        return _eval(node, ns)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, IndexError, KeyError) as exc:
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
    if isinstance(node, ast.BoolOp):  # short-circuits on a known value, as Python does, even past unknown ones
        stop, unknown = not isinstance(node.op, ast.And), None
        for v in node.values:
            try:
                if bool(_eval(v, ns)) == stop:
                    return stop
            except Unknown as exc:
                unknown = exc
        if unknown is not None:
            raise unknown
        return not stop
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
        name = _name(node)
        if name in _HINTS:
            return _eval(node.args[0], ns)
        if name == "num_programs" and GRID in ns:
            return ns[GRID][_eval(node.args[0], ns)]
        if name in _CALLS:
            return _CALLS[name](*(_eval(a, ns) for a in node.args))
    raise Unknown(type(node).__name__)


def _name(call) -> str:
    return getattr(call.func, "attr", getattr(call.func, "id", ""))


def _stored(node) -> set:
    return {t.id for t in ast.walk(node) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}


def _blocks(st) -> list:
    return [b for b in (getattr(st, "body", None), getattr(st, "orelse", None)) if isinstance(b, list) and b]


def _holds(block: list, line: int) -> bool:
    return bool(block) and block[0].lineno <= line <= block[-1].end_lineno


def _exec(stmts: list, ns: dict, line=None) -> None:
    """Run into ns the statements before `line` (all of them if None), descending into the block that holds it:
    simple assignments are evaluated, ifs with a known test run their taken side, anything else forgets what it
    stores (a loop's carried values included)."""
    for st in stmts:
        if line is not None and st.lineno > line:
            return
        if line is not None and line <= st.end_lineno:
            if isinstance(st, (ast.For, ast.While)):
                for t in _stored(st):
                    ns.pop(t, None)
            for block in _blocks(st):
                if _holds(block, line):
                    _exec(block, ns, line)
            return
        if isinstance(st, ast.If):
            with contextlib.suppress(Unknown):
                taken = st.body if evaluate(st.test, ns) else st.orelse
                _exec(taken, ns)
                continue
        target = st.targets[0] if isinstance(st, ast.Assign) and len(st.targets) == 1 else getattr(st, "target", None)
        value = None
        if isinstance(st, (ast.Assign, ast.AnnAssign)) and isinstance(target, ast.Name) and st.value is not None:
            with contextlib.suppress(Unknown):
                value = (target.id, evaluate(st.value, ns))
        for t in _stored(st):
            ns.pop(t, None)
        if value:
            ns[value[0]] = value[1]


def _last_program(fn, test) -> bool:
    """`ticket == ...` where the ticket comes from tl.atomic_add: true in the one program that takes that ticket."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    names = {n.id for n in (test.left, test.comparators[0]) if isinstance(n, ast.Name)}
    return any(isinstance(a, ast.Assign) and isinstance(a.value, ast.Call) and _name(a.value) == "atomic_add"
               and _stored(a) & names for a in ast.walk(fn))


def _jitted(fn) -> bool:
    """Decorated @triton.jit (or @jit, or called with arguments)."""
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        if getattr(d, "attr", getattr(d, "id", None)) == "jit":
            return True
    return False


def _one_trip(fn, st, ns: dict):
    """(is ==, trip) for an if testing the induction variable of its enclosing range-`for` against a value that
    does not change in the loop (c0 != c_y: every tile but the one holding the true class); else None."""
    t = st.test
    if not (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], (ast.Eq, ast.NotEq))):
        return None
    for loop in (n for n in ast.walk(fn) if isinstance(n, ast.For) and isinstance(n.target, ast.Name)):
        if not _holds(loop.body, st.lineno):
            continue
        var = loop.target.id
        sides = [t.left, t.comparators[0]]
        names = [{n.id for n in ast.walk(x) if isinstance(n, ast.Name)} for x in sides]
        if not any(isinstance(x, ast.Name) and x.id == var for x in sides) or all(var in n for n in names):
            continue
        with contextlib.suppress(Unknown):
            return isinstance(t.ops[0], ast.Eq), _trip(loop, ns)
    return None


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

    @staticmethod
    def at(fn, entry: dict, line: int) -> dict:
        """fn's namespace at `line`, from its entry namespace."""
        ns = dict(entry)
        _exec(fn.body, ns, line)
        return ns

    def frames(self, chain: tuple, kernel_ns: dict, globals_ns: dict) -> list:
        """[(file, function, entry namespace, line)] from the kernel (chain[-1]) inward to chain[0]; a helper's
        parameters come from its call site in the frame outside it."""
        out = []
        for depth in range(len(chain) - 1, -1, -1):
            file, line = chain[depth]
            fn = self.func_at(file, line)
            if fn is None:
                break
            entry = dict(kernel_ns) if not out else self._bind(fn, out[-1], globals_ns)
            out.append((file, fn, entry, line))
        return out

    def _bind(self, callee, caller_frame, globals_ns: dict) -> dict:
        _, caller, entry, call_line = caller_frame
        caller_ns = self.at(caller, entry, call_line)
        ns = dict(globals_ns, **({GRID: caller_ns[GRID]} if GRID in caller_ns else {}))
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

    def functions(self, file: str) -> dict:
        """name -> (file, function) of the kernel's file and of the Python files beside it (the kernel's helpers may
        live in a sibling module); the kernel's own file wins a name clash."""
        folder, out = os.path.dirname(file), {}
        for other in sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []:
            path = os.path.join(folder, other)
            if path != file:  # only @triton.jit functions of the other files: no host code by the same name
                out.update((f.name, (path, f)) for f in self.nodes(path, ast.FunctionDef) if _jitted(f))
        out.update((f.name, (file, f)) for f in self.nodes(file, ast.FunctionDef))
        return out

    def call_paths(self, file: str, kernel, target, const_ns: dict, globals_ns: dict) -> list[list[tuple]]:
        """Call sites (file, line), innermost first, of every path from `kernel` to `target` through live code: a
        call under an if whose constexpr test is false leaves no code."""
        paths, funcs = [], self.functions(file)

        def live_calls(fn, entry, stmts):
            for st in stmts:
                if isinstance(st, ast.If):
                    try:
                        taken = (st.body,) if evaluate(st.test, self.at(fn, entry, st.lineno)) else (st.orelse,)
                    except Unknown:
                        taken = (st.body, st.orelse)
                    for block in taken:
                        yield from live_calls(fn, entry, block)
                elif isinstance(st, (ast.For, ast.While, ast.With)):
                    yield from live_calls(fn, entry, st.body + getattr(st, "orelse", []))
                else:
                    yield from (c for c in ast.walk(st) if isinstance(c, ast.Call))

        def walk(fn_file, fn, entry, sites):
            if fn is target:
                paths.append(sites)
                return
            for call in live_calls(fn, entry, fn.body):
                callee_file, callee = funcs.get(_name(call), (None, None))
                if callee is not None and callee is not fn and len(sites) < 16:
                    walk(callee_file, callee, self._bind(callee, (fn_file, fn, entry, call.lineno), globals_ns),
                         [(fn_file, call.lineno)] + sites)

        walk(file, kernel, dict(const_ns), [])
        return paths

    def contexts(self, chain: tuple, env: Env) -> list[tuple]:
        """Full chains (kernel frame last) in which the code at `chain` can run."""
        kernel = next((f for f in self.nodes(env.kernel[0], ast.FunctionDef) if f.name == env.kernel[1]), None)
        outer = self.func_at(*chain[-1]) if chain else None
        if kernel is None or outer is None or outer is kernel:
            return [chain]
        paths = self.call_paths(env.kernel[0], kernel, outer, env.consts, env.globals)
        return [chain + tuple(p) for p in paths] or [chain]

    def if_factor(self, chain: tuple, env: Env) -> tuple[float, list]:
        """(how often the code at `chain` runs per program given its ifs, [(file, if line, side)] of the ifs that
        only the data decides)."""
        factor, unknown = 1.0, []
        for (file, fn, ev, line), (_, _, ec, _) in zip(self.frames(chain, env.values, env.globals),
                                                       self.frames(chain, env.consts, env.globals)):
            for st in (n for n in ast.walk(fn) if isinstance(n, ast.If)):
                side = "then" if _holds(st.body, line) else "else" if _holds(st.orelse, line) else None
                if side is None:
                    continue
                with contextlib.suppress(Unknown):
                    evaluate(st.test, self.at(fn, ec, st.lineno))
                    continue  # a constexpr test: the compiler already kept one side
                if _last_program(fn, st.test):
                    factor /= env.programs
                    continue
                once = _one_trip(fn, st, self.at(fn, ev, st.lineno))
                if once is not None:  # `c0 != c` / `c0 == c` in the loop over c0: all trips but one / one trip
                    op_eq, trip = once
                    factor *= (1 if op_eq == (side == "then") else trip - 1) / trip if trip else 0.0
                    continue
                try:
                    taken = bool(evaluate(st.test, self.at(fn, ev, st.lineno)))
                except Unknown:
                    unknown.append((file, st.lineno, side))
                    continue
                factor *= taken == (side == "then")
        return factor, unknown


def _trip(node, ns: dict):
    with contextlib.suppress(Unknown, TypeError):  # range / tl.range (its keywords only tune the schedule)
        return len(range(*(evaluate(a, ns) for a in node.iter.args)))


@dataclass
class Env:
    """The launch as the source sees it: the kernel's (file, function name), every launch value (constexprs, runtime
    scalars, GRID), the constexprs alone (what the compiler could fold), the module's constants, the programs."""
    kernel: tuple
    values: dict
    consts: dict
    globals: dict
    programs: int = 1
