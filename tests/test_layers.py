"""The package's import graph, read from the source with `ast`: layers import downward only, and no cycles.

kernels/ imports nothing of the project; pipelines/ imports neither engine/ nor bench/; engine/ does not import
bench/. Upward imports count wherever they sit (a function-level import is still a dependency), and so does a
module named in a string (`importlib.import_module("bench.train")`). Cycles count among every import, function-level
ones included: a function-level import only postpones a cycle to the first call.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "pipelines", "engine", "bench")
# What each layer must not import.
FORBIDDEN = {"kernels": {"pipelines", "engine", "bench"}, "pipelines": {"engine", "bench"}, "engine": {"bench"}}
# The `selfdistill` command sits above every layer: it runs `selfdistill bench ...` by importing the bench module
# named in its table, only when that subcommand is called.
DISPATCH_BY_NAME = {"engine.cli"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest project module that `name` names or lies in (`engine.types.Batch` -> `engine.types`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        found = {_resolve(a.name, modules) for a in node.names}
    else:
        base = node.module or ""
        if node.level:  # relative: anchor at this module's package
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        # `from pkg import mod` imports the submodule `pkg.mod`; `from mod import name` imports `mod`
        found = {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _resolve(base, modules)
                 for a in node.names}
    return found - {None}


@functools.cache
def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, dict[str, set[str]]]:
    """{module: {"top": modules imported when it is imported, "all": every module it imports anywhere,
    "named": modules it names in a string}}."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)
    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        top, every, named = set(), set(), set()

        def visit(node, at_top: bool):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    t = _targets(child, mod, is_package, modules)
                    every.update(t)
                    if at_top:
                        top.update(t)
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    visit(child, False)
                elif isinstance(child, ast.Constant) and isinstance(child.value, str) and "." in child.value \
                        and child.value in modules:  # a dotted path: "bench" alone is also a command's name
                    named.add(child.value)
                else:
                    visit(child, at_top)  # class bodies, try/if blocks at module level run at import

        visit(tree, True)
        graph[mod] = {"top": top - {mod}, "all": every - {mod}, "named": named - {mod}}
    return graph


def upward_imports(graph) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        layer = mod.split(".")[0]
        for d in sorted(deps["all"] | (set() if mod in DISPATCH_BY_NAME else deps["named"])):
            if d.split(".")[0] in FORBIDDEN.get(layer, ()):
                bad.append(f"{mod} -> {d}")
    return bad


def cycles(graph, edges: str = "all") -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), over every import ("all") or over
    module-level ones ("top")."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v][edges]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []  # function-level imports included


def test_graph_holds_known_edges_of_the_package():
    """Guards the two checks above against a parser that finds nothing."""
    g = import_graph()
    assert "pipelines.factory" in g["engine.setup_run"]["top"]
    assert "engine.train" in g["engine.cli"]["all"] - g["engine.cli"]["top"]  # imported inside a function
    assert "bench.train" in g["engine.cli"]["named"]
    assert "pipelines.batch" in g["engine.types"]["top"]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_on_a_made_up_tree(tmp_path):
    """An upward import inside a function and one by name are found, the command line's dispatch by name is not;
    a cycle through a relative `from . import module` is found, and one through a function-level import is found
    among all imports but not among module-level ones."""
    root = _tree(tmp_path, {
        "kernels/__init__.py": "",
        "kernels/k.py": "def f():\n    from engine.a import x\n",
        "pipelines/__init__.py": "",
        "pipelines/p.py": "from . import q\n",
        "pipelines/q.py": "from pipelines import p\n",
        "engine/__init__.py": "",
        "engine/a.py": "import engine.b\nx = 1\n",
        "engine/b.py": "def g():\n    import engine.a\n",
        "engine/c.py": "import importlib\n\ndef h():\n    return importlib.import_module('bench.x')\n",
        "engine/cli.py": "TOOLS = {'x': 'bench.x'}\n",
        "bench/__init__.py": "",
        "bench/x.py": "",
    })
    g = import_graph(root)
    assert upward_imports(g) == ["engine.c -> bench.x", "kernels.k -> engine.a"]
    assert cycles(g, "top") == [["pipelines.p", "pipelines.q"]]
    assert cycles(g) == [["engine.a", "engine.b"], ["pipelines.p", "pipelines.q"]]
