"""AWQ's scale search in its Gram-matrix form against the direct form, on every group of a model.

    .venv/bin/python bench/awq_gram_check.py --samples 16 --seq-len 512

quantmill.solvers.awq.awq_search_scales scores each ratio as sum((D G) * D) with G = X^T X in float64; the
paper's (and llm-compressor's) direct form is mean((X W^T - (X / s) Q(W s)^T)^2) in float32. This
runs the w4a16-awq-g64 recipe on the demo model (de-quantized once, as bench/vs_llmcompressor.py
does) with every search computed both ways, and prints per group the largest relative difference
of the error curves and whether both forms chose the same ratio, then the time of each form.
Exit status 1 if any group's choice differs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

from quantmill.core.threads import prefer_passive_waits  # noqa: E402

prefer_passive_waits()  # before torch (quantmill/core/threads.py says why)

import torch  # noqa: E402

from bench.tables import table  # noqa: E402
from bench.vs_llmcompressor import calibration_ids, float_checkpoint  # noqa: E402


@torch.no_grad()
def direct_errors(linears, inputs, act_mean_abs, bits, group_size, symmetric, grid, col_index) -> list[float]:
    """The search's error curve computed as the paper writes it (the code before the Gram form)."""
    from quantmill.solvers.awq import _rtn, normalised_scales

    C = linears[0].in_features
    X = inputs.reshape(-1, C).float()
    Ws = [lin.weight.detach().float() for lin in linears]
    Y = [X @ W.t() for W in Ws]
    n_out = sum(y.numel() for y in Y)
    errors = []
    for i in range(grid):
        s = normalised_scales(act_mean_abs, i / grid)
        s_cols = s if col_index is None else s[col_index]
        errors.append(sum((X @ (_rtn(W * s_cols[None, :], bits, group_size, symmetric) / s_cols[None, :]).t() - y).pow(2).sum().item() for W, y in zip(Ws, Y)) / n_out)
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a float checkpoint folder (default: the demo model, de-quantized)")
    ap.add_argument("--work", default="/tmp/quantmill-stage-profile")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--recipe", default="w4a16-awq-g64")
    args = ap.parse_args()

    import quantmill.solvers.awq as awq
    from quantmill.methods.base import MethodContext
    from quantmill.methods.registry import REGISTRY
    from quantmill.methods.recipe_files import load_recipe
    from quantmill.io.sources import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = float_checkpoint(work, args.model)
    _, ids = calibration_ids(folder, work, args.samples, args.seq_len)
    gram_search = awq.awq_search_scales
    rows: list[list[str]] = []
    seconds = {"gram": 0.0, "direct": 0.0}
    mismatches = 0

    def both(linears, inputs, act_mean_abs, bits, group_size, symmetric, grid=20, col_index=None, name="linears"):
        nonlocal mismatches
        start = time.perf_counter()
        s, gram = gram_search(linears, inputs, act_mean_abs, bits, group_size, symmetric, grid, col_index, name)
        seconds["gram"] += time.perf_counter() - start
        start = time.perf_counter()
        direct = direct_errors(linears, inputs, act_mean_abs, bits, group_size, symmetric, grid, col_index)
        seconds["direct"] += time.perf_counter() - start
        rel = max(abs(g - d) / max(abs(d), 1e-30) for g, d in zip(gram, direct))
        same = gram.index(min(gram)) == direct.index(min(direct))
        mismatches += not same
        rows.append([name, f"{rel:.1e}", str(gram.index(min(gram))), str(direct.index(min(direct))), "yes" if same else "NO"])
        return s, gram

    awq.awq_search_scales = both
    recipe = load_recipe(args.recipe)
    model = load_model(folder)
    REGISTRY[recipe.method].run(MethodContext(model=model, recipe=recipe, stats={}, calibration=ids, device=torch.device("cpu")))
    print(f"{args.recipe} on {folder}, {args.samples} x {args.seq_len} calibration tokens, torch {torch.__version__}")
    print(table(["group (first Linear)", "max rel. diff of errors", "gram ratio i", "direct ratio i", "same choice"], rows))
    print(f"groups {len(rows)}, same choice {len(rows) - mismatches}; search time: gram form {seconds['gram']:.1f} s, direct form {seconds['direct']:.1f} s")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
