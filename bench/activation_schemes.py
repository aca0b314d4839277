"""Activation quantization schemes on `demo`: W8A8 int8 (dynamic per token; static per tensor with
min-max, 99.99th percentile, MSE and KL observers) and FP8 E4M3 (dynamic, static), through the
quantize flow with the default calibration (64 x 512 stdlib:calib) and evaluation (32 x 512
stdlib:eval), so every shared stage (resolve, calibration, stats, the float evaluation) is reused
from the store.

Prints three tables:
1. recipe, ppl, ppl ratio to FP, KL, top-1 agreement, quantize time, eval time, size, and the max
   |logit difference| between transformers' `AutoModelForCausalLM.from_pretrained` and quantmill's
   `load_quantized` on the first evaluation window;
2. per static recipe (observer) and Linear kind: the median calibration absmax, the median clip
   threshold, the fraction of calibration values clipped and the expected relative rms error of
   the quantized inputs (rounding + clipping, from the stats histogram);
3. the same for the modules with the largest activations;
4. an ablation: w8a8-dynamic and the best static recipe with one kind of Linear's inputs left in
   float, on the first few eval windows.

Run (reusing the cached demo store):
    QUANTMILL_HOME=/tmp/qmdemo PREFECT_HOME=/tmp/phdemo nice -n 10 .venv/bin/python bench/activation_schemes.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy 2-core machine
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RECIPES = [
    "w8a8-dynamic",
    "w8a8-dynamic-sym",
    "w8a8-static-minmax",
    "w8a8-static-pct9999",
    "w8a8-static-mse",
    "w8a8-static-kl",
    "fp8-dynamic",
    "fp8-static",
]


from bench.tables import fmt, table  # noqa: E402  (after the sys.path line above)

if TYPE_CHECKING:
    import torch


def first_window(model_dir: Path, spec) -> "torch.Tensor":
    from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
    from quantmill.io.sources import load_tokenizer

    text = load_text(parse_spec(spec.dataset))
    tokens = tokenize_prefix(load_tokenizer(model_dir), text, spec.seq_len)
    return first_windows(tokens, 1, spec.seq_len)


def transformers_gap(checkpoint: Path, window) -> tuple[float, float]:
    """max |logits(transformers) - logits(quantmill)| on one window, and the logits' max |value|."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantmill.io.checkpoint import load_quantized

    with torch.no_grad():
        ours = load_quantized(checkpoint)(input_ids=window, use_cache=False).logits
        served = AutoModelForCausalLM.from_pretrained(checkpoint).eval()(input_ids=window, use_cache=False).logits
    return (served - ours).abs().max().item(), ours.abs().max().item()


def kind(module: str) -> str:
    leaf = module.rsplit(".", 1)[-1]
    return {"q_proj": "q/k/v", "k_proj": "q/k/v", "v_proj": "q/k/v", "gate_proj": "gate/up", "up_proj": "gate/up"}.get(leaf, leaf)


def observer_tables(rows: list[dict], stats_dir: Path) -> tuple[str, str]:
    """Per static recipe and Linear kind, and for the largest-activation modules: the ranges from
    each quantize entry's report.json, the errors recomputed from the stored stats."""
    from quantmill.methods.recipe_files import load_recipe
    from quantmill.methods.schemes import input_rel_rmse
    from quantmill.model.stats import load_stats

    stats = load_stats(stats_dir)
    reports = {}
    for r in rows:
        report = json.loads((Path(r["checkpoint"]).parent / "report.json").read_text())
        if report and "act_lo" in report[0]:
            act = load_recipe(r["recipe"]).activations
            for row in report:
                row["act_rel_rmse"] = input_rel_rmse(stats[row["module"]], act, row["act_lo"], row["act_hi"])
            reports[r["recipe"]] = report
    by_kind = []
    for recipe, report in reports.items():
        kinds: dict[str, list[dict]] = {}
        for row in report:
            kinds.setdefault(kind(row["module"]), []).append(row)
        for k in ("q/k/v", "o_proj", "gate/up", "down_proj", "all"):
            group = report if k == "all" else kinds.get(k, [])
            if not group:
                continue
            by_kind.append([
                recipe, k, str(len(group)),
                fmt(statistics.median(x["act_absmax"] for x in group), ".2f"),
                fmt(statistics.median(x["act_hi"] for x in group), ".3f"),
                fmt(statistics.mean(x["act_clipped_fraction"] for x in group), ".2e"),
                fmt(statistics.mean(x["act_rel_rmse"] for x in group), ".3f"),
                fmt(max(x["act_rel_rmse"] for x in group), ".3f"),
            ])
    header = ["recipe", "Linears", "n", "median absmax", "median clip t", "mean clipped", "mean rel rms err", "max rel rms err"]
    worst_modules: list[str] = []
    if reports:
        first = next(iter(reports.values()))
        shared = (".k_proj", ".v_proj", ".up_proj")  # read the same input as q_proj / gate_proj
        distinct = [x for x in first if not x["module"].endswith(shared)]
        worst_modules = [x["module"] for x in sorted(distinct, key=lambda x: -x["act_absmax"])[:6]]
    worst = []
    for module in worst_modules:
        for recipe, report in reports.items():
            x = next(row for row in report if row["module"] == module)
            worst.append([f"{module} ({kind(module)})", recipe, fmt(x["act_absmax"], ".2f"), fmt(x["act_hi"], ".3f"), fmt(x["act_clipped_fraction"], ".2e"), fmt(x["act_rel_rmse"], ".3f")])
    worst_header = ["module", "recipe", "absmax", "clip t", "clipped", "rel rms err"]
    return table(header, by_kind), table(worst_header, worst)


def ablation(summary: dict, model_dir: Path, spec, n_windows: int) -> str:
    """ppl ratio on the first n windows of w8a8-dynamic and the best static int8 recipe, with every
    Linear input quantized, and with the inputs of one kind of Linear left in float (weights stay
    int8): which inputs cost the most."""
    import dataclasses

    import torch

    from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
    from quantmill.io.checkpoint import load_quantized
    from quantmill.eval.evaluate import evaluate_windows
    from quantmill.nn.quant_linear import QuantLinear
    from quantmill.io.sources import load_model, load_tokenizer

    rows = {r["recipe"]: r for r in summary["rows"]}
    static = [r for r in summary["rows"] if r["recipe"].startswith("w8a8-static")]
    picks = [name for name in ["w8a8-dynamic", min(static, key=lambda r: r["ppl"])["recipe"] if static else None] if name in rows]
    if not picks:
        return ""
    text = load_text(parse_spec(spec.dataset))
    windows = first_windows(tokenize_prefix(load_tokenizer(model_dir), text, n_windows * spec.seq_len), n_windows, spec.seq_len)
    ref = evaluate_windows(load_model(model_dir), windows).ppl
    out = []
    for name in picks:
        model = load_quantized(Path(rows[name]["checkpoint"]))
        qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        schemes = {n: m.scheme for n, m in qlinears.items()}
        for label in ("all inputs quantized", "q/k/v", "o_proj", "gate/up", "down_proj"):
            for n, m in qlinears.items():
                m.scheme = dataclasses.replace(schemes[n], act="none") if kind(n) == label else schemes[n]
            with torch.no_grad():
                ppl = evaluate_windows(model, windows).ppl
            out.append([name, label if label.startswith("all") else f"{label} inputs in float", f"{ppl:.3f}", f"{ppl / ref:.4f}"])
    return f"float ppl on these {n_windows} windows: {ref:.3f}\n\n" + table(["recipe", "variant", "ppl", "ppl ratio"], out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--recipe", action="append", help="default: the W8A8 / FP8 recipes above")
    parser.add_argument("--no-transformers-check", action="store_true")
    parser.add_argument("--ablation-windows", type=int, default=8, help="0: skip the per-Linear-kind ablation")
    args = parser.parse_args(argv)

    from quantmill.flows.quantize import quantize_flow
    from quantmill.tasks.calibrate import EvaluationSpec
    from quantmill.tasks.store import Store

    start = time.perf_counter()
    summary = quantize_flow(model=args.model, recipes=args.recipe or RECIPES)
    wall = time.perf_counter() - start
    fp = summary["reference"]
    model_dir = Store().get("resolve_model", summary["model_key"]).path / "checkpoint"

    window = None if args.no_transformers_check else first_window(model_dir, EvaluationSpec())
    header = ["recipe", "ppl", "ppl ratio", "KL", "top-1 agree", "quant s", "eval s", "size MB", "HF max|dlogit|"]
    rows = [["float (reference)", fmt(fp["ppl"], ".3f"), "1.0000", "-", "-", "-", fmt(fp["seconds"], ".1f"), fmt(fp["size_mb"], ".1f"), "-"]]
    for r in summary["rows"]:
        gap = "-"
        if window is not None:
            diff, scale = transformers_gap(Path(r["checkpoint"]), window)
            gap = f"{diff:.2e} ({diff / scale:.1e} rel)"
        rows.append([
            r["recipe"], fmt(r["ppl"], ".3f"), fmt(r["ppl_ratio"], ".4f"), fmt(r["kl"], ".4f"), fmt(r["top1_agreement"], ".4f"),
            fmt(r["quantize_seconds"], ".1f"), fmt(r["seconds"], ".1f"), fmt(r["size_mb"], ".1f"), gap,
        ])
    cached = sum(s["cached"] for s in summary["stages"])
    print(f"\n{args.model}: {cached}/{len(summary['stages'])} stages cached; flow wall time {wall:.0f} s")
    print("eval s: the evaluate stage's time for the quantized and the float forward passes over the windows")
    print("HF max|dlogit|: transformers from_pretrained vs quantmill load_quantized, first eval window (512 tokens)\n")
    print(table(header, rows))
    stats_key = next(st["key"] for st in summary["stages"] if st["stage"] == "collect_stats")
    by_kind, worst = observer_tables(summary["rows"], Store().get("collect_stats", stats_key).path)
    print("\nStatic input ranges per observer (clip t from each quantize entry's report.json; clipped: fraction")
    print("of calibration values beyond t; rel rms err = sqrt(E[(x - Q(x))^2] / E[x^2]) over the calibration")
    print("histogram, rounding and clipping together):\n")
    print(by_kind)
    print("\nThe Linears with the largest calibration activations:\n")
    print(worst)
    if args.ablation_windows:
        print(f"\nWhich inputs cost the most (first {args.ablation_windows} eval windows; weights stay int8):\n")
        print(ablation(summary, model_dir, EvaluationSpec(), args.ablation_windows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
