"""Optional engines stay optional: only their executor module imports them."""
from __future__ import annotations

import ast
from pathlib import Path

import robbench

PACKAGE = Path(robbench.__file__).parent
OPTIONAL = {"ray": "executors/ray.py"}  # top-level module -> the one robbench file allowed to import it


def _imported_top_levels(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_executor_module_imports_an_optional_engine():
    offenders = [(str(path.relative_to(PACKAGE)), module) for path in sorted(PACKAGE.rglob("*.py"))
                 for module in _imported_top_levels(path) & set(OPTIONAL)
                 if str(path.relative_to(PACKAGE)) != OPTIONAL[module]]
    assert offenders == []
    assert "ray" in _imported_top_levels(PACKAGE / OPTIONAL["ray"])  # the walk does see its import
