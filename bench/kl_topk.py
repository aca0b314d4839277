"""How far the evaluation's top-k KL is from the exact KL, on real models.

quantmill's evaluate stage runs the float model once and keeps, per position, its k most likely
tokens (quant.evaluate.REFERENCE_TOPK) plus the mass of the rest; each recipe's KL is then the KL
of the two distributions coarsened to those k tokens and one bucket (a lower bound of the exact
KL). This script runs the float and each quantized model over the same windows once, and computes
from the same logits the exact KL and the coarse KL for several k.

Run (the demo model; quantized checkpoints from the flow's store, cached when already made):
    QUANTMILL_HOME=/tmp/qmdemo .venv/bin/python bench/kl_topk.py --windows 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tables import fmt, table  # noqa: E402

KS = (16, 32, 64, 128, 256, 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--recipe", action="append", help="recipes (default: w8a16-rtn, w4a16-rtn-g64)")
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from flows.quantize import quantize_flow
    from quant.calibration import first_windows, load_text, parse_spec, tokenize_prefix
    from quant.checkpoint import load_quantized
    from quant.evaluate import coarse_kl, tail_logmass
    from quant.sources import load_model, load_tokenizer
    from tasks.calibrate import EvaluationSpec
    from tasks.store import Store

    recipes = args.recipe or ["w8a16-rtn", "w4a16-rtn-g64"]
    spec = EvaluationSpec(windows=args.windows)
    summary = quantize_flow(model=args.model, recipes=recipes, evaluation=spec)
    model_dir = Store().get("resolve_model", summary["model_key"]).path / "checkpoint"
    windows = first_windows(tokenize_prefix(load_tokenizer(model_dir), load_text(parse_spec(spec.dataset)), spec.windows * spec.seq_len), spec.windows, spec.seq_len)
    reference = load_model(model_dir).eval()
    rows = []
    with torch.no_grad():
        ref_logp = [F.log_softmax(reference(w[None], use_cache=False).logits[0, :-1].float(), -1) for w in windows]
        for row in summary["rows"]:
            candidate = load_quantized(row["checkpoint"]).eval()
            exact, coarse, tokens = 0.0, dict.fromkeys(KS, 0.0), 0
            for w, p in zip(windows, ref_logp):
                q = F.log_softmax(candidate(w[None], use_cache=False).logits[0, :-1].float(), -1)
                exact += F.kl_div(q, p, log_target=True, reduction="sum").item()
                for k in KS:
                    top = torch.topk(p, k, dim=-1)
                    coarse[k] += coarse_kl(top.values, top.indices, tail_logmass(p, top.indices), q).sum().item()
                tokens += q.shape[0]
            rows.append([row["recipe"], fmt(exact / tokens, ".5f"), fmt(row["kl"], ".5f")]
                        + [f"{coarse[k] / tokens:.5f} ({coarse[k] / exact:.4f})" for k in KS])
            del candidate
    print(f"\n{args.model}: {spec.windows} x {spec.seq_len} tokens of {spec.dataset}; coarse KL (share of the exact KL) by k\n")
    print(table(["recipe", "exact KL", "stage KL"] + [f"k={k}" for k in KS], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
