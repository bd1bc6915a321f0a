"""The package's structure holds: layers, no import cycles, small modules, no reaching in.

These are the rules docs/explanation/architecture.md states, checked on the
source itself (ast, no imports), so a change that breaks one fails here.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "connserver"
MAX_LINES = 600
# Layers, lowest first: a module may import its own layer and those below it.
LAYERS = ["", "protocols", "core", "broadcast", "operations", "soak", "apps", "lab", "daemon"]
# Top-level modules every layer may use (the exception tree, configuration).
SHARED = {"connserver.errors", "connserver.config"}
# The top-level package and the pytest plugin put everything together.
COMPOSITION = {"connserver", "connserver.__main__", "connserver.testing"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every connserver module ``name`` imports, at any level (TYPE_CHECKING included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in known and candidate != name:
                found.add(candidate)
    return found


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else ""


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_no_import_cycles():
    """No cycle among connserver's modules, counting type-checking imports too."""
    edges = {name: {t for t in targets if t not in COMPOSITION}
             for name, targets in graph().items() if name not in COMPOSITION}
    # Package __init__ modules only describe their package.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target] if target in trail
                              else [node, target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_layer_imports_only_itself_and_below():
    """The core never imports broadcast, operations, the daemon or soak; and so on up."""
    wrong = []
    for name, targets in graph().items():
        if name in COMPOSITION or name in SHARED:
            continue
        mine = LAYERS.index(layer_of(name))
        for target in targets:
            if target in SHARED or target in COMPOSITION and target != "connserver.testing":
                continue
            if target == "connserver.testing" or LAYERS.index(layer_of(target)) > mine:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports from a higher layer: " + ", ".join(sorted(wrong))


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_600_lines(name):
    """A module past 600 lines is asking to be split."""
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def _private_names_defined(tree: ast.AST) -> set[str]:
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in ("self", "cls") and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            defined.add(node.value)   # names in __slots__
    return {name for name in defined if name.startswith("_") and not name.startswith("__")}


def test_no_module_reaches_into_another_objects_private_attributes():
    """``other._name`` is never a private attribute that another connserver module defines.

    (Through ``self``, a class and its mixins share their attributes; private names
    of the standard library's objects are not this rule's business.)
    """
    trees = {name: ast.parse(path.read_text()) for name, path in modules().items()}
    defined = {name: _private_names_defined(tree) for name, tree in trees.items()}
    everywhere = set().union(*defined.values())
    offences = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in everywhere:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in defined[name]:
                continue   # its own class's attribute, on another instance of it
            offences.append(f"{name}:{node.lineno} .{node.attr}")
    assert not offences, "private attributes of other modules' objects: " + ", ".join(offences)


def test_a_missing_service_fails_under_ci_and_skips_only_locally(monkeypatch):
    """unavailable(): the suite's only skip; with CI=true it fails instead."""
    from tests.conftest import unavailable

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        unavailable("no haproxy")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        unavailable("no haproxy")


def test_no_test_skips_except_through_unavailable():
    """No skipif/importorskip/pytest.skip anywhere in tests but inside unavailable()."""
    tests = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for path in tests.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(word in line for word in ("skipif", "importorskip", "pytest.skip(")):
                if path.name == "conftest.py" and line.strip() == "pytest.skip(reason)":
                    continue
                if path == pathlib.Path(__file__).resolve():
                    continue
                offenders.append(f"{path.relative_to(tests)}:{number}")
    assert not offenders, offenders
