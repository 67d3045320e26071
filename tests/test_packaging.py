"""Every third-party module the package imports is a declared dependency of the distribution that provides it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level module names imported at module level and inside functions (lazy) by one file."""
    eager, lazy = set(), set()
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        (lazy if id(node) in inside else eager).update(n.split(".")[0] for n in names)
    return eager, lazy


def test_every_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    extras = set().union(*(requirement_names(r) for r in project.get("optional-dependencies", {}).values()))
    providers = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted((ROOT / "layerwise").rglob("*.py")):
        eager, lazy = imports(path)
        for names, allowed in ((eager, core), (lazy - eager, core | extras)):
            for name in sorted(names - set(sys.stdlib_module_names) - {"layerwise", "__future__"}):
                dists = {d.lower().replace("_", "-") for d in providers.get(name, [name])}
                if not dists & allowed:
                    missing.append(f"{path.relative_to(ROOT)}: {name} ({', '.join(sorted(dists))})")
    # An optional extra may only be imported lazily, where the feature that needs it runs.
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)
