"""SmoothQuant's alpha choices on `demo`, scored on two texts and with and without weight error.

For each alpha choice (a fixed alpha, or the per-block alphas a smoothquant recipe's quantize entry
recorded in its notes), smooth a fresh float model, fake-quantize every decoder Linear as W8A8
with per-token inputs (quantmill.solvers.smoothquant.apply_fake_w8a8) and report ppl ratio, KL and top-1
agreement against the float model on
  - calib: calibration samples that the alpha search did not see (the search uses the first
    `search_samples`, 8; these are the last N of the 64, which the stats stage did see);
  - eval: the first K windows of the evaluation text (what the other benches report).
With --a8-only the weights are left in float, so the difference to the W8A8 row is the weights'
share of the error after smoothing.

Run (reusing the demo store, after bench/outliers.py made the smoothquant entries):
    QUANTMILL_HOME=/tmp/qmdemo .venv/bin/python bench/smoothquant_alpha.py --recipe w8a8-smoothquant-auto --alpha 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tables import fmt, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=[], help="a smoothquant recipe whose quantize entry holds the alphas")
    parser.add_argument("--alpha", action="append", type=float, default=[], help="a fixed alpha")
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--a8-only", action="store_true", help="also score each choice with float weights")
    args = parser.parse_args(argv)

    import torch

    from quantmill.model.arch import block_folds, decoder_layers, layout_of
    from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
    from quantmill.eval.evaluate import evaluate_windows
    from quantmill.methods.smoothquant import block_act_absmax, smooth_layer
    from quantmill.methods.recipe_files import load_recipe
    from quantmill.solvers.smoothquant import apply_fake_w8a8
    from quantmill.io.sources import load_model, load_tokenizer
    from quantmill.model.stats import load_stats
    from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec, calibration_key, read_token_table
    from quantmill.tasks.quantize import quantize_key
    from quantmill.tasks.resolve import resolve_key
    from quantmill.tasks.stats import stats_key
    from quantmill.tasks.store import Store

    torch.set_grad_enabled(False)
    store = Store()
    model_entry = store.get("resolve_model", resolve_key("demo"))
    if model_entry is None:
        print("error: no demo model in the store ($QUANTMILL_HOME): run make demo or bench/outliers.py first", file=sys.stderr)
        return 2
    model_dir = model_entry.path / "checkpoint"
    calib_key = calibration_key(model_entry.key, CalibrationSpec())
    skey = stats_key(model_entry.key, calib_key)
    stats = load_stats(store.get("collect_stats", skey).path)
    ids = read_token_table(store.get("capture_calibration", calib_key).path / "samples.parquet")
    calib = ids[-args.calib_windows :]
    spec = EvaluationSpec(windows=args.eval_windows)
    text = load_text(parse_spec(spec.dataset))
    eval_windows = first_windows(tokenize_prefix(load_tokenizer(model_dir), text, spec.windows * spec.seq_len), spec.windows, spec.seq_len)

    choices: dict[str, list] = {f"alpha {a:g}": None for a in args.alpha}
    fixed = {f"alpha {a:g}": a for a in args.alpha}
    for name in args.recipe:
        recipe = load_recipe(name)
        entry = store.get("quantize", quantize_key(model_entry.key, calib_key, skey, recipe))
        if entry is None:
            print(f"error: recipe {recipe.name} has no quantize entry in the store: run bench/outliers.py --recipe {name} first", file=sys.stderr)
            return 2
        choices[recipe.name] = entry.manifest["notes"]["smoothquant_alphas"]
    reference = load_model(model_dir).eval()
    prefix = layout_of(reference).layers
    names = block_folds(reference, "smoothquant")

    rows = []
    for label, alphas in choices.items():
        for a8_only in ([False, True] if args.a8_only else [False]):
            model = load_model(model_dir).eval()
            for i, layer in enumerate(decoder_layers(model)):
                p = f"{prefix}.{i}"
                smooth_layer(layer, names, block_act_absmax(stats, p), fixed[label] if alphas is None else alphas[i], p)
                floats = {n: m.weight.detach().clone() for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
                apply_fake_w8a8(layer, "token")
                if a8_only:
                    for n, w in floats.items():
                        layer.get_submodule(n).weight.copy_(w)
            row = [label, "A8 (float W)" if a8_only else "W8A8"]
            for windows in (calib, eval_windows):
                m = evaluate_windows(model, windows, reference, desc=label)
                row += [fmt(m.ppl / m.reference_ppl, ".4f"), fmt(m.kl, ".4f"), fmt(m.top1_agreement, ".4f")]
            rows.append(row)
    header = ["alphas", "quantized", "calib ppl ratio", "calib KL", "calib top-1", "eval ppl ratio", "eval KL", "eval top-1"]
    print(f"\ncalib: the last {len(calib)} of {len(ids)} calibration samples (not seen by the alpha search); eval: {spec.windows} x {spec.seq_len} of {spec.dataset}\n")
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
