"""The package's shape: no import cycle between its modules, no package import hidden inside a function,
no private name taken from another module, and every third-party import declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "layerwise"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path):
    """(node, imported module, names, inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    here = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, [], id(node) in inside
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
                module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
            yield node, module, [a.name for a in node.names], id(node) in inside


def own_edges(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (``from pkg import submodule`` counts the submodule)."""
    out = set()
    for _, module, names, _ in imports(path):
        if module in MODULES:
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            out.update(subs or [module])
            if subs and len(subs) < len(names):
                out.add(module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = {name: own_edges(path) for name, path in MODULES.items()}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_package_import_inside_a_function_and_no_private_name_across_modules():
    problems = []
    for name, path in MODULES.items():
        for node, module, names, in_function in imports(path):
            if module != "layerwise" and not module.startswith("layerwise."):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if in_function:
                problems.append(f"{where}: imports {module} inside a function")
            problems += [f"{where}: imports private {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert problems == []


def requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


def test_every_third_party_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    extras = set().union(*(requirement_names(r) for r in project.get("optional-dependencies", {}).values()))
    providers = importlib.metadata.packages_distributions()
    missing = []
    for path in MODULES.values():
        for node, module, _, in_function in imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ("layerwise", "__future__", ""):
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
            # An optional extra may only be imported where the feature that needs it runs (inside a function).
            if not dists & (core | extras if in_function else core):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {top} ({', '.join(sorted(dists))})")
    assert missing == [], "imported but not declared in pyproject.toml"
