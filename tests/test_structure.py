"""Rules a maintainer relies on: short functions, short signatures, no import cycle, a repository about itself.

They are checked here rather than by a linter plug-in because none of the listed dependencies
measures function length or import cycles; the rules are a few lines of `ast`.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "statprune_cli"
MAX_LINES = 60
MAX_PARAMS = 8


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (``statprune_cli.methods.base``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere, lazy imports inside functions included."""
    package = name if any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``, which never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _runtime_nodes(ast.Module(body=node.orelse, type_ignores=[]))
            continue
        yield node
        yield from _runtime_nodes(node)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_functions_are_short_and_take_few_parameters():
    offenders = []
    for name, tree in _modules().items():
        for fn in _functions(tree):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_LINES or _param_count(fn) > MAX_PARAMS:
                offenders.append(f"{name}.{fn.name}: {lines} lines, {_param_count(fn)} parameters")
    assert not offenders, "\n".join(offenders)


def test_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_finder_finds_a_lazy_import_cycle():
    """The check above would pass vacuously if `_imports` missed imports inside functions."""
    a = ast.parse("def f():\n    from statprune_cli import b\n"
                  "if TYPE_CHECKING:\n    from statprune_cli import c\n")
    b = ast.parse("from .a import x\n")
    known = {"statprune_cli", "statprune_cli.a", "statprune_cli.b", "statprune_cli.c"}
    graph = {"statprune_cli.a": _imports("statprune_cli.a", a, known),
             "statprune_cli.b": _imports("statprune_cli.b", b, known)}
    assert graph == {"statprune_cli.a": {"statprune_cli.b"},
                     "statprune_cli.b": {"statprune_cli.a"}}
    graph["statprune_cli"] = set()
    assert _cycle(graph) == ["statprune_cli.a", "statprune_cli.b", "statprune_cli.a"]


def test_long_function_is_reported():
    tree = ast.parse("def f(a, b, c, d, e, f, g, h, i):\n" + "    x = 1\n" * MAX_LINES)
    (fn,) = _functions(tree)
    assert fn.end_lineno - fn.lineno + 1 > MAX_LINES and _param_count(fn) == 9


def test_repository_never_speaks_of_how_it_was_built():
    """Docs, code and scripts speak of the project; the word is split so this file passes its own check."""
    root = PACKAGE.parent
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    word = re.compile(r"\bses" + r"sions?\b", re.IGNORECASE)
    hits = [f"{name}:{i}" for name in listed.stdout.split()
            if (root / name).suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ""}
            and (root / name).is_file()
            for i, line in enumerate((root / name).read_text(errors="replace").splitlines(), 1)
            if word.search(line)]
    assert not hits, hits
