"""quant/ is a plain library: importing every module of it pulls in neither prefect nor mlflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

QUANT = Path(__file__).resolve().parent.parent / "quant"
FORBIDDEN = ("prefect", "mlflow")


def test_quant_source_never_imports_prefect_or_mlflow():
    for path in QUANT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_all_of_quant_loads_neither():
    modules = sorted(p.stem for p in QUANT.glob("*.py") if p.stem != "__init__")
    code = "import sys\n" + "".join(f"import quant.{m}\n" for m in modules) + (
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=QUANT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
