"""quantmill's packages are layers: every import, at the top of a module or inside a function,
points down the list below (or stays inside its own package), and the module graph has no cycle.
The numerical layers (core .. eval) never import prefect or mlflow, so every function of them can
be used from a notebook without a server.

A module's package is the folder under quantmill/ (`quantmill/methods/gptq.py` -> methods); the
modules directly in quantmill/ (cli, serve, catalog, ...) are the `app` layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quantmill"

# Lowest first: a package may import only packages to its left (and itself).
LAYERS = ("core", "solvers", "nn", "model", "methods", "io", "eval", "tasks", "flows", "app")
NUMERICAL = LAYERS[: LAYERS.index("eval") + 1]
FORBIDDEN = ("prefect", "mlflow")

# (importing module, imported module) -> why this upward import is right. Keep it short.
ALLOWED = {
    ("quantmill", "quantmill.fetch"): (
        "quantmill.load() is the public entry point for loading a registered model; the package root "
        "imports fetch inside load() so that importing any quantmill.* module does not load mlflow"
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of a quantmill module name; "root" for the package itself (it holds __version__)."""
    parts = module.split(".")
    if parts == ["quantmill"]:
        return "root"
    return parts[1] if parts[1] in LAYERS else "app"


def rank(layer: str) -> int:
    return -1 if layer == "root" else LAYERS.index(layer)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-local ones included; `from X import Y`
    counts as an import of X.Y when that is a module, else of X."""
    known = modules()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in known else node.module))
    return found


def quantmill_imports() -> list[tuple[str, int, str]]:
    """(importer, line, imported) for every import of one quantmill module by another."""
    return [
        (name, line, target)
        for name, path in modules().items()
        for line, target in imports_of(path)
        if target == "quantmill" or target.startswith("quantmill.")
    ]


def test_every_package_imports_only_the_layers_below_it():
    bad = []
    for importer, line, target in quantmill_imports():
        src, dst = layer_of(importer), layer_of(target)
        if rank(dst) > rank(src) and (importer, target) not in ALLOWED:
            bad.append(f"{importer}:{line} ({src}) imports {target} ({dst})")
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_the_check_covers_every_package_pair():
    """Every package is a known layer, and the rule is checked for each ordered pair of layers: an
    upward import between any two would fail the test above (proved on a made-up import)."""
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LAYERS) - {"app"}, f"packages that are no layer (add them to LAYERS): {packages ^ (set(LAYERS) - {'app'})}"
    for low in LAYERS:
        for high in LAYERS:
            lo_mod = "quantmill.cli" if low == "app" else f"quantmill.{low}.x"
            hi_mod = "quantmill.cli" if high == "app" else f"quantmill.{high}.x"
            upward = rank(layer_of(hi_mod)) > rank(layer_of(lo_mod))
            assert upward == (LAYERS.index(high) > LAYERS.index(low))


def test_allowed_exceptions_are_still_needed():
    present = {(i, t) for i, _, t in quantmill_imports()}
    stale = [pair for pair in ALLOWED if pair not in present]
    assert not stale, f"ALLOWED names imports that no longer exist: {stale}"


def test_no_import_cycles_between_modules():
    """Function-local imports included: a cycle is not broken by moving one side into a function."""
    graph: dict[str, set[str]] = {}
    for importer, _, target in quantmill_imports():
        if (importer, target) not in ALLOWED and target != importer:
            graph.setdefault(importer, set()).add(target)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_numerical_layers_never_import_prefect_or_mlflow():
    for name, path in modules().items():
        if layer_of(name) not in NUMERICAL:
            continue
        for line, target in imports_of(path):
            assert target.split(".")[0] not in FORBIDDEN, f"{name}:{line} imports {target}"


def test_importing_all_of_the_numerical_layers_loads_neither():
    names = [n for n in modules() if layer_of(n) in NUMERICAL]
    code = "import sys\n" + "".join(f"import {n}\n" for n in names) + (
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
