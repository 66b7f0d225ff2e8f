"""Dynamic SASS instruction counts of one compiled Triton kernel at one launch (used by kernels/aot/check.py).

Input: `nvdisasm -c -gi` text (line info) and the launch's values (constexprs, integers, the grid).
    source  each instruction gets a call chain from the kernel to its line: the line info's own where it records
            inlining (Triton 3.9), else rebuilt from the source's live calls, through @triton.jit helpers of the
            kernel's file and its sibling modules (Triton 3.6: a helper called from
            several places takes the calls that agree with the SASS loops it sits in, or out of). An instruction
            whose only line is in Triton's library takes the chain of the instruction before it.
    values  a function's locals are evaluated in order from its parameters (the launch values, or a helper's call
            site): arithmetic, min / max / cdiv, tl.multiple_of (the value itself), tl.num_programs (the grid),
            through ifs whose test is known; anything else (a load, a program id, an atomic) is unknown
    loops   every backward branch (a branch to itself is the trap after the final EXIT and ends the code); its
            source loop is the range-`for` holding most of its instructions, innermost on a tie (a static_range is
            unrolled, never a SASS loop); trip = len(range(...)) of that `for` in its function's values
    ifs     a runtime if whose test the launch values decide (a tail tile under `if c_full < C`) counts its taken
            side only; an if on `ticket == ...` with the ticket from tl.atomic_add (the last program to finish
            reduces) runs in one program per launch: its code counts 1 / programs per thread; an if testing a
            range-`for`'s induction variable against a loop-invariant value (`c0 != c_y`) is taken on every trip
            but one (`==`: on one); an if only the data decides counts both sides, unless both hold loops: then
            only the costlier side (an upper bound)
    count   each instruction x its loops' trips x its ifs' factors, per thread averaged over the grid (= per warp:
            every instruction issues once per warp, predicated or not). A loop whose trip cannot be evaluated
            counts once and is flagged.
"""
from __future__ import annotations

import ast
import os
import re
from collections import Counter
from dataclasses import dataclass

import triton

from kernels.aot.source import Env, Source, Unknown, _holds, _name, _trip, evaluate


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


@dataclass
class Loop:
    first: int
    last: int
    where: str = "?"  # file:line of its source `for`, '?' when unmapped
    trip: object = None  # int, or None when it cannot be evaluated
    body: int = 0  # static instructions in it (nested loops included)
    branch: tuple = ()  # ((file, if line, 'then'|'else'), ...) data-dependent ifs around it
    counted: bool = True
    site: tuple = ()  # the `for` and the call sites leading to it: one per source loop instance
    copies: int = 1  # SASS copies expected from enclosing tl.static_range loops (0: unknown)
    node: tuple = ()  # (file, first line, last line) of the source `for`


def _through(chain: tuple, node: tuple) -> bool:
    return any(f == node[0] and node[1] <= ln <= node[2] for f, ln in chain)


def _map(loop: Loop, chains: list[tuple], src: Source, env: Env) -> list[str]:
    best = None
    for file in {f for ch in chains for f, _ in ch}:
        for node in src.nodes(file, ast.For):
            if not (isinstance(node.iter, ast.Call) and _name(node.iter) == "range"):
                continue  # static_range and Python iterables are unrolled by the front end
            n = sum(_through(ch, (file, node.lineno, node.end_lineno)) for ch in chains)
            key = (n, node.lineno - node.end_lineno)  # most instructions, then the innermost
            if n and (best is None or key > best[0]):
                best = (key, file, node)
    if best is None:
        return []
    _, file, node = best
    loop.node = (file, node.lineno, node.end_lineno)
    ch = next(c for c in chains if _through(c, loop.node))
    k = next(j for j, (f, ln) in enumerate(ch) if _through(((f, ln),), loop.node))
    sites, notes = src.contexts(((file, node.lineno),) + ch[k + 1:], env), []
    loop.where, loop.site = f"{os.path.basename(file)}:{node.lineno}", sites[0]
    trips = set()
    for site in sites:
        frames = src.frames(site, env.values, env.globals)
        if frames and frames[-1][1] is src.func_at(file, node.lineno):
            trips.add(_trip(node, src.at(*frames[-1][1:])))
    loop.trip = max((t for t in trips if t is not None), default=None)
    if len(trips) > 1:
        notes.append(f"loop at {loop.where}: {len(sites)} live call paths with trips {sorted(trips, key=str)}, "
                     "took the largest")
    for _, fn, entry, ln in src.frames(loop.site, env.consts, env.globals):
        for st in (n for n in ast.walk(fn) if isinstance(n, ast.For) and n is not node):
            if _name(st.iter) == "static_range" and _holds(st.body, ln):
                try:  # unrolled by the front end: one SASS copy of this loop per iteration
                    ns = src.at(fn, entry, st.lineno)
                    loop.copies *= len(range(*(evaluate(a, ns) for a in st.iter.args)))
                except Unknown:
                    loop.copies = 0
    loop.branch = tuple(src.if_factor(loop.site, env)[1])
    return notes


def _own_chains(code: list[Instr]) -> list[tuple]:
    """Each instruction's chain without Triton's own library frames (tl.sum, ...: they hold no kernel loop or if);
    an instruction left with none takes the previous one's."""
    skip, last, out = os.path.dirname(triton.__file__), (), []
    for ins in code:
        last = tuple(p for p in ins.chain if not p[0].startswith(skip)) or last
        out.append(last)
    return out


def count(sass_text: str, env: Env, src: Source | None = None) -> dict:
    """{'static', 'per_thread', 'ops' (dynamic counts per opcode family: MUFU.EX2, LDL, ...), 'loops' [Loop],
    'notes' [str]} for one kernel at one launch, per thread averaged over the grid."""
    src = src or Source()
    code = parse_sass(sass_text)
    own = _own_chains(code)
    loops, notes = [Loop(a, b) for a, b in find_loops(code)], []
    for lp in loops:
        idx = [j for j, i in enumerate(code) if lp.first <= i.addr <= lp.last]
        lp.body = len(idx)
        notes += _map(lp, [own[j] for j in idx], src, env)
    nodes, memo, mult = [lp.node for lp in loops if lp.node], {}, []
    for ins, chain in zip(code, own):
        around = [lp for lp in loops if lp.first <= ins.addr <= lp.last]
        key = (chain, tuple(lp.node for lp in around if lp.node))
        if key not in memo:  # the calls that put this code inside (or outside) the loops the SASS puts it in
            ctx = src.contexts(chain, env)
            fit = [c for c in ctx if all(_through(c, n) for n in key[1])] if key[1] else \
                [c for c in ctx if not any(_through(c, n) for n in nodes)]
            memo[key] = max(src.if_factor(c, env)[0] for c in fit or ctx)
        m = memo[key]
        for lp in around:
            m *= lp.trip if lp.trip is not None else 1
        mult.append(m)
    notes += [f"loop at {lp.where}: trip unknown, counted once" for lp in loops if lp.trip is None]
    for lp in (lp for lp in loops if lp.node):  # its body's exponentials outside it: peeled iterations of an unroll
        peeled = sum(i.op == "MUFU.EX2" and _through(ch, (lp.node[0], lp.node[1] + 1, lp.node[2])) and not any(
            o.first <= i.addr <= o.last for o in loops if o.node == lp.node) for i, ch in zip(code, own))
        notes += [f"loop at {lp.where}: {peeled} MUFU.EX2 of its body outside it (peeled: unrolled?), an upper bound"
                  ] if peeled else []
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
            cost = {s: sum(m for i, m in zip(code, mult) if any(lp.first <= i.addr <= lp.last for lp in lps))
                    for s, lps in by_side.items()}
            keep = max(cost, key=cost.get)
            for lp in by_side["else" if keep == "then" else "then"]:
                lp.counted = False
            notes.append(f"runtime if at {os.path.basename(f)}:{line}: counted its {keep} side "
                         f"({cost[keep]:g} instr/thread), not the other ({min(cost.values()):g})")
    ops: Counter = Counter()
    for i, m in zip(code, mult):
        if m and all(lp.counted or not lp.first <= i.addr <= lp.last for lp in loops):
            ops[i.op if i.op.startswith("MUFU") else i.op.split(".")[0]] += m
    return dict(static=len(code), per_thread=sum(ops.values()), ops=ops, loops=loops, notes=notes)
