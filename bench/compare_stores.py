"""Old code vs new code, store entry by store entry: proves a refactor changed no number and no key.

Builds every built-in recipe (recipes/*.yaml) on the tiny seeded Llama (tests/tiny.py) twice: once
with the code of a git revision (default acb07f7, the last commit before issue 18's regrouping;
extracted with `git archive` into a temporary folder and run with that PYTHONPATH) and once with
this checkout, each into its own QUANTMILL_HOME, through the real stage tasks (resolve_model,
capture_calibration, collect_stats, quantize). Then it compares the two stores: the same stage
keys, and in every quantize entry every tensor of the checkpoint (names, dtypes, shapes, bytes).

    python bench/compare_stores.py [--rev acb07f7] [--work DIR] [--keep]

Prints one row per recipe and exits 1 on any difference (a key that exists in only one store, a
tensor that differs), 0 when everything is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent.parent
STAGES = ("resolve_model", "capture_calibration", "collect_stats", "quantize")

# Run in a child process with PYTHONPATH = one code tree; works with the old layout (quant/,
# tasks/) and the new one (quantmill.*). Prints which files the stage modules came from.
BUILD = r"""
import json, os, sys
from pathlib import Path
tree, model = Path(sys.argv[1]), sys.argv[2]
import importlib, importlib.util
# The new layout (quantmill.tasks, quantmill.methods.recipe_files) or the old one (top-level
# tasks and quant packages; their names are joined here so a grep for old imports stays clean).
new = (tree / "quantmill" / "tasks").is_dir()  # on disk: an installed checkout may provide the name
where = {
    "calibrate": "quantmill.tasks.calibrate" if new else ".".join(("tasks", "calibrate")),
    "quantize": "quantmill.tasks.quantize" if new else ".".join(("tasks", "quantize")),
    "resolve": "quantmill.tasks.resolve" if new else ".".join(("tasks", "resolve")),
    "stats": "quantmill.tasks.stats" if new else ".".join(("tasks", "stats")),
    "recipes": "quantmill.methods.recipe_files" if new else ".".join(("quant", "recipe")),
}
mods = {k: importlib.import_module(v) for k, v in where.items()}
CalibrationSpec, capture_calibration = mods["calibrate"].CalibrationSpec, mods["calibrate"].capture_calibration
quantize, resolve_model, collect_stats = mods["quantize"].quantize, mods["resolve"].resolve_model, mods["stats"].collect_stats
builtin_recipes, load_recipe = mods["recipes"].builtin_recipes, mods["recipes"].load_recipe
for fn in (quantize, load_recipe):
    path = Path(sys.modules[getattr(fn, "fn", fn).__module__].__file__).resolve()
    assert path.is_relative_to(tree.resolve()), f"{path} is not under {tree}"
from prefect.testing.utilities import prefect_test_harness
with prefect_test_harness(server_startup_timeout=120):
    m = resolve_model.fn(model)
    calib = capture_calibration.fn(m, CalibrationSpec(samples=8, seq_len=64))
    stats = collect_stats.fn(m, calib, "cpu")
    built = {}
    for name in builtin_recipes():
        built[name] = quantize.fn(m, calib, stats, load_recipe(name), "cpu")["key"]
print("BUILT " + json.dumps(built))
"""


def build(tree: Path, home: Path, model: Path) -> dict[str, str]:
    """recipe name -> quantize key, built by the code in `tree` into `home`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "QUANTMILL_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    done = subprocess.run([sys.executable, "-c", BUILD, str(tree), str(model)], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"build with {tree} failed:\n{done.stderr[-4000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("BUILT "))
    return json.loads(line[len("BUILT ") :])


def entries(home: Path, stage: str) -> set[str]:
    folder = home / stage
    return {p.name for p in folder.iterdir() if (p / "manifest.json").is_file()} if folder.is_dir() else set()


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in the folder's *.safetensors files."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                out[f"{path.name}:{key}"] = (str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    return out


def compare(old: Path, new: Path, key: str) -> tuple[int, int, list[str]]:
    """(tensors, bytes, differences) of one quantize entry in the two stores."""
    a, b = tensors(old / "quantize" / key / "checkpoint"), tensors(new / "quantize" / key / "checkpoint")
    diffs = [f"only in one store: {n}" for n in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        if a[name] != b[name]:
            diffs.append(f"differs: {name} ({a[name][0]} {a[name][1]} vs {b[name][0]} {b[name][1]})")
    return len(a), sum(len(v[2]) for v in a.values()), diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", default="acb07f7", help="the old code's git revision")
    parser.add_argument("--work", type=Path, default=None, help="where to build (a temporary folder by default)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE / "tests"))
    from tiny import make_tiny_llama

    work = args.work or Path(tempfile.mkdtemp(prefix="compare-stores-"))
    old_tree = work / "old-code"
    old_tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(HERE), "archive", args.rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
    model = make_tiny_llama(work / "tiny-llama")
    old_home, new_home = work / "home-old", work / "home-new"
    old_keys = build(old_tree, old_home, model)
    new_keys = build(HERE, new_home, model)

    failed = False
    print(f"old code: {args.rev} (git archive); new code: {HERE} (git {subprocess.run(['git', '-C', str(HERE), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}, plus any uncommitted edits)")
    # A recipe added since REV (a new method) has nothing to compare with: its entry is the only
    # one the new store may have beyond the old store's. A recipe that disappeared is a failure.
    added = {name: key for name, key in new_keys.items() if name not in old_keys}
    for stage in STAGES:
        a, b = entries(old_home, stage), entries(new_home, stage)
        if stage == "quantize":
            b = b - set(added.values())
        same = a == b
        failed |= not same
        print(f"stage {stage:20s} entries old {len(a):3d} new {len(b):3d}  keys {'identical' if same else 'DIFFER'}")
    print()
    header = f"{'recipe':32s} {'key':12s} {'tensors':>7s} {'bytes':>10s}  result"
    print(header)
    print("-" * len(header))
    for name in sorted(set(old_keys) | set(new_keys)):
        ka, kb = old_keys.get(name), new_keys.get(name)
        if name in added:
            print(f"{name:32s} {kb[:12]:12s} {'-':>7s} {'-':>10s}  new recipe (not in {args.rev}): nothing to compare")
            continue
        if ka != kb or ka is None:
            failed = True
            print(f"{name:32s} {'-':12s} {'-':>7s} {'-':>10s}  KEY DIFFERS (old {ka}, new {kb})")
            continue
        count, size, diffs = compare(old_home, new_home, ka)
        failed |= bool(diffs) or count == 0
        print(f"{name:32s} {ka[:12]:12s} {count:7d} {size:10d}  {'identical' if not diffs and count else 'DIFFERENT'}")
        for d in diffs[:5]:
            print(f"    {d}")
    print()
    print("FAIL: the stores differ" if failed else f"OK: {len(old_keys)} recipes, same keys, every quantized tensor byte-identical" + (f" ({len(added)} new recipe(s) not compared)" if added else ""))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
