"""The import rule of docs/architecture.md, enforced: every module of ``noah_ray`` imports only
layers below its own (siblings joined by ``|`` never import each other), and no module takes part
in an import circle.  Every import statement counts, the ones inside functions too, and so does
``importlib.import_module("noah_ray...")``; the root package's lazy facade (``noah_ray.__init__``,
PEP 562) is the one exception, and it may eagerly import only the ground and ``space``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "noah_ray"

#: bottom to top; a tuple of several names is a row of independent siblings
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "progress", "security"), ("space",), ("config",), ("evolution", "store"), ("data",), ("nn",),
    ("interop", "search"), ("train",), ("hpo",), ("run",), ("cli",))
GROUND = LAYERS[0]


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a ``noah_ray`` module in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            out += [(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((arg.value, node.lineno))
    return [(m, line) for m, line in out if m == "noah_ray" or m.startswith("noah_ray.")]


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def rank(layer: str) -> int:
    return next(i for i, row in enumerate(LAYERS) if layer in row)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t, _ in imports(m, p, known)} - {m} for m, p in known.items()}


def violations() -> list[str]:
    known, bad = modules(), []
    for name, path in known.items():
        if name == "noah_ray":
            continue
        for target, line in imports(name, path, known):
            a, b = layer_of(name), layer_of(target)
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if not b:
                bad.append(f"{where}: the root package (a facade) is imported by no module")
            elif a == b:
                continue
            elif rank(b) > rank(a):
                bad.append(f"{where}: {b} is above {a}")
            elif rank(b) == rank(a) and a not in GROUND:
                bad.append(f"{where}: {a} and {b} are siblings")
    return bad


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_layer():
    layers = {layer_of(m) for m in modules()} - {""}
    assert layers <= {name for row in LAYERS for name in row}, layers


def test_no_module_imports_a_layer_above_or_a_sibling():
    assert violations() == []


def test_no_import_circles():
    assert circles(graph()) == []


def test_the_root_facade_imports_only_the_ground_and_space_eagerly():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    targets = {layer_of(n.module) for n in eager if isinstance(n, ast.ImportFrom) and n.module
               and n.module.startswith("noah_ray")}
    assert targets <= {*GROUND, "space"}, targets


@pytest.mark.parametrize("source, found", [
    ("from noah_ray.cli.main import main\n", ["noah_ray.cli.main"]),
    ("def f():\n    from noah_ray.train import runs\n", ["noah_ray.train.runs"]),
    ("import importlib\nimportlib.import_module('noah_ray.hpo.driver')\n", ["noah_ray.hpo.driver"]),
])
def test_the_walker_sees_every_kind_of_import(tmp_path, source, found):
    """A check that cannot fail is no check: the walker finds top-level, function-level and
    importlib imports, and an upward one is reported."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = modules()
    got = [m for m, _ in imports("noah_ray.space.probe", path, known)]
    assert got == found
    assert all(rank(layer_of(m)) > rank("space") for m in got)


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
