"""The shape of the code, checked: no import cycle inside robbench/, and the harness (robbench/ outside
robbench/paper/) never names a built-in plugin, so everything it does works for a third party's too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "robbench"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """robbench modules that ``name`` imports anywhere in its body (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    # A package's __init__ runs when any submodule is imported, but importing a submodule does not
    # make the package import it back: drop parent-package edges so "robbench.x -> robbench" is no cycle.
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; depth-first search with colours."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_inside_robbench():
    graph = import_graph()
    assert "robbench.montecarlo" in graph and "robbench.decoding" in graph["robbench.kernels"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def _builtin_plugin_names() -> set[str]:
    """Names registered by the built-in plugin package (robbench_plugins), of every kind."""
    from robbench.plugins import get_registries

    regs = get_registries()
    names = set()
    for registry in regs.by_kind().values():
        names |= {n for n in registry.names() if registry.source(n).startswith("robbench ")
                  and "engine" not in registry.source(n)}
    return names


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_harness_names_no_builtin_plugin():
    builtins = _builtin_plugin_names()
    assert {"beta_vae", "max_damage", "margin", "bound", "mnist"} <= builtins
    offences = []
    for name, path in sorted(_modules().items()):
        if name.startswith("robbench.paper"):
            continue
        imports = _imports(path, name, set(_modules()) | {"robbench_plugins"})
        if any(t.startswith("robbench_plugins") for t in imports):
            offences.append(f"{name} imports robbench_plugins")
        offences += [f"{name}:{line} names {value!r}" for line, value in _string_constants(path) if value in builtins]
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("module", ["robbench.leaderboard", "robbench.runner", "robbench.execute", "robbench.api"])
def test_core_modules_import_nothing_from_the_paper_layer(module):
    graph = import_graph()
    assert not any(t.startswith("robbench.paper") for t in graph[module])


# --- names used but never defined ------------------------------------------------------------------
# Session 7's shared set-up for benchmarks/attack_basins/ left three scripts printing `pick[...]`, a
# variable the refactor had removed: each crashed with NameError after its whole measurement. Running
# every script is slow; reading every file for global names it uses and never defines is not.
_MODULE_DUNDERS = {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__package__", "__builtins__",
                   "__path__", "__annotations__", "__dict__", "__class__"}


def undefined_globals(source: str, filename: str) -> list[tuple[int, str]]:
    """(line of the scope, name) of every global name ``source`` reads but never defines at module level
    (assignment, import, def, class) and that is no builtin; a module with ``import *`` is not checked."""
    import builtins
    import symtable

    top = symtable.symtable(source, filename, "exec")
    symbols = top.get_symbols()
    if any(s.get_name() == "*" for s in symbols):
        return []
    known = ({s.get_name() for s in symbols if s.is_assigned() or s.is_imported() or s.is_namespace()}
             | set(dir(builtins)) | _MODULE_DUNDERS)
    found: list[tuple[int, str]] = []

    def walk(table: symtable.SymbolTable) -> None:
        for s in table.get_symbols():
            implicit_global = table is top or (s.is_global() and not s.is_declared_global())
            if s.is_referenced() and implicit_global and s.get_name() not in known:
                found.append((table.get_lineno(), s.get_name()))
        for child in table.get_children():
            walk(child)

    walk(top)
    return found


def test_the_undefined_name_finder_finds_them():
    assert undefined_globals("def f():\n    return pick[0]\n", "x.py") == [(1, "pick")]
    assert undefined_globals("for b in range(2):\n    print(pick[b])\n", "x.py") == [(0, "pick")]
    assert undefined_globals("import os\npick = 1\ndef f():\n    return pick, os, len, __file__\n", "x.py") == []


def test_no_python_file_reads_a_global_name_it_never_defines():
    repo = ROOT.parent
    files = [p for folder in ("robbench", "plugins", "benchmarks", "tests", "examples") for p in (repo / folder).rglob("*.py")]
    assert len(files) > 100
    problems = [f"{p.relative_to(repo)}:{line} {name}" for p in files
                for line, name in undefined_globals(p.read_text(), str(p))]
    assert not problems, "names used but never defined: " + ", ".join(problems)
