"""The package's layers: every package is installed, no import cycle anywhere, imports only run
in the allowed directions, and function-local imports only defer optional or start-up costs
(docs/architecture.md)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package prefix (pyproject.toml package-dir)
TREES = {"refmtp": "refmtp", "backends": "refmtp.backends", "cli": "refmtp.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in TREES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module an import names (a package's __init__ when it names a package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, module: str):
    """(imported module, is_function_local, line) for every refmtp import of a file."""
    tree = ast.parse(path.read_text())
    local_nodes = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_nodes |= {id(n) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("refmtp"):
                target = _resolve(n)
                if target and target != module:
                    yield target, id(node) in local_nodes, node.lineno


def _graph(include_local=True):
    return {m: {t for t, local, _ in _imports(p, m) if include_local or not local}
            for m, p in MODULES.items()}


def test_every_package_is_installed():
    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+ (tomllib)")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"} | {"refmtp.golden"}
    assert packages <= listed, f"not in pyproject.toml [tool.setuptools] packages: {sorted(packages - listed)}"


def test_no_import_cycle_local_imports_included():
    graph = _graph(include_local=True)
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    sys.setrecursionlimit(max(1000, 10 * len(graph)))
    for m in sorted(graph):
        if m not in state:
            visit(m)


# The layers, lowest first; a module may import its own layer and the layers below it.
LAYERS = [
    ("foundation", ("refmtp.backends", "refmtp.config", "refmtp.mutation", "refmtp.params",
                    "refmtp.checkpoint", "refmtp")),
    ("math", ("refmtp.model",)),
    ("inference", ("refmtp.inference",)),
    ("training", ("refmtp.training",)),
    ("verification", ("refmtp.verification",)),
    ("cli", ("refmtp.cli",)),
]


def _layer(module: str) -> int:
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > depth:
                best, depth = i, len(pre)
    assert best is not None, module
    return best


# documented exceptions to "import only your layer or below" (docs/architecture.md)
ALLOWED_UP = {
    ("refmtp.backends.cupy_accept", "refmtp.inference.acceptance"),
    ("refmtp.backends.numba_accept", "refmtp.inference.acceptance"),
}


def test_imports_follow_the_layers():
    bad = []
    for m, targets in _graph(include_local=True).items():
        for t in targets:
            if _layer(t) > _layer(m) and (m, t) not in ALLOWED_UP \
                    and not (m.startswith("refmtp.backends.") and t.startswith("refmtp.model.")):
                bad.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


# where a function-local import defers something: an optional dependency (cupy and its
# wrappers, the Numba kernels and their JIT start-up) or the CLI's start-up (`refmtp --help`)
DEFERRING = ("refmtp.cli.", "refmtp.backends.")


def test_function_local_imports_only_where_they_defer():
    """Inside the math, inference, training and verification layers every refmtp import is at
    module top; only the CLI and the optional backends defer imports."""
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t}"
           for m, p in MODULES.items() if not (m + ".").startswith(DEFERRING)
           for t, local, line in _imports(p, m) if local]
    assert not bad, "function-local refmtp imports:\n" + "\n".join(bad)


def test_architecture_page_lists_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for m, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or rel.startswith("cli/"):
            continue
        if rel not in page and path.name not in page:
            missing.append(rel)
    assert not missing, f"docs/architecture.md has no line for: {missing}"
