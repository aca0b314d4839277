"""Where the error of W8A8 int8 and FP8 comes from on `demo`, on text the recipes were not chosen on.

For each scheme, quantize every decoder Linear of a fresh float model in one of three ways:
weights and inputs, inputs only (float weights) or weights only (float inputs); and, for the
inputs, all Linears or one kind at a time (q/k/v, o_proj, gate/up, down_proj). Report the ppl
ratio and KL against the float model on
  - calib-heldout: the last 8 of the 64 calibration samples (the stats stage saw them; nothing
    in these schemes is calibrated on them, they are dynamic);
  - a second text given with --text (a file), e.g. the licence texts every Debian/Ubuntu
    machine has, which share nothing with the Python docstrings of the calibration and eval text.

This is the measurement behind two recipe choices: `w8a8-dynamic` quantizes inputs with a zero
point (its error is nearly all inputs, and a zero point halves it) and `fp8-dynamic` GPTQs its
weights (e4m3 weights carry most of the FP8 error).

Run (reusing the demo store; the licence text as in docs/BENCHMARKS.md):
    cat /usr/share/common-licenses/{GPL-3,Apache-2.0,MPL-2.0,GFDL-1.3,LGPL-2.1} > /tmp/licenses.txt
    QUANTMILL_HOME=/tmp/qmdemo .venv/bin/python bench/error_split.py --text /tmp/licenses.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tables import fmt, table  # noqa: E402

KINDS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate/up": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def split_linear(linear, scheme, quant_weights: bool, quant_inputs: bool):
    """A Linear computing QuantLinear's fake path with either half switched off."""
    import torch.nn.functional as F
    from torch import nn

    from quantmill.nn.quant_linear import QuantLinear

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = QuantLinear.from_linear(linear, scheme, path="fake")
            self.w = self.q.dequantized_weight() if quant_weights else linear.weight.detach().float()
            self.b = linear.bias

        def forward(self, x):
            x2 = x.reshape(-1, x.shape[-1]).float()
            if quant_inputs:
                x2 = self.q.fake_quantize_input(x2)
            return F.linear(x2, self.w, self.b).reshape(*x.shape[:-1], -1).to(x.dtype)

    return Split()


def quantized_model(model_dir: Path, scheme, quant_weights: bool, quant_inputs: bool, kind: str | None):
    from torch import nn

    from quantmill.io.sources import load_model

    model = load_model(model_dir).eval()
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear) or name.endswith("lm_head"):
            continue
        if kind is not None and name.rsplit(".", 1)[-1] not in KINDS[kind]:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, split_linear(linear, scheme, quant_weights, quant_inputs))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, help="a second, unrelated text file")
    parser.add_argument("--windows", type=int, default=8, help="windows of 512 tokens per text")
    parser.add_argument("--scheme", choices=["int8", "fp8", "all"], default="all")
    parser.add_argument("--no-kinds", action="store_true", help="skip the per-Linear-kind rows")
    args = parser.parse_args(argv)

    import torch

    from quantmill.model.calibration import first_windows, tokenize_prefix
    from quantmill.eval.evaluate import evaluate_windows
    from quantmill.nn.quant_linear import QuantScheme
    from quantmill.io.sources import load_model, load_tokenizer
    from quantmill.tasks.calibrate import CalibrationSpec, calibration_key, read_token_table
    from quantmill.tasks.resolve import resolve_key
    from quantmill.tasks.store import Store

    torch.set_grad_enabled(False)
    store = Store()
    model_entry = store.get("resolve_model", resolve_key("demo"))
    calib_entry = None if model_entry is None else store.get("capture_calibration", calibration_key(model_entry.key, CalibrationSpec()))
    if calib_entry is None:
        print("error: no demo model and calibration in the store ($QUANTMILL_HOME): run make demo first", file=sys.stderr)
        return 2
    if args.text is not None and not args.text.is_file():
        print(f"error: --text {args.text}: no such file", file=sys.stderr)
        return 2
    model_dir = model_entry.path / "checkpoint"
    texts = {"calib-heldout": read_token_table(calib_entry.path / "samples.parquet")[-args.windows :]}
    if args.text is not None:
        tokens = tokenize_prefix(load_tokenizer(model_dir), args.text.read_text(), args.windows * 512)
        texts[args.text.name] = first_windows(tokens, args.windows, 512)
    reference = load_model(model_dir).eval()

    schemes = {
        "int8 sym": QuantScheme(act="dynamic"),
        "int8 zero point": QuantScheme(act="dynamic", act_symmetric=False),
        "fp8": QuantScheme(weight_type="fp8", act="dynamic", act_type="fp8"),
    }
    plan = []  # (scheme label, what is quantized, weights?, inputs?, kind)
    for label in schemes:
        if args.scheme == "int8" and not label.startswith("int8") or args.scheme == "fp8" and label != "fp8":
            continue
        plan += [(label, "W + A", True, True, None), (label, "A only", False, True, None)]
        if label != "int8 zero point":  # its weights are int8 sym's
            plan.append((label, "W only", True, False, None))
        if not args.no_kinds and label != "int8 zero point":
            plan += [(label, f"A only: {kind}", False, True, kind) for kind in KINDS]
    rows = []
    for label, what, qw, qa, kind in plan:
        model = quantized_model(model_dir, schemes[label], qw, qa, kind)
        row = [label, what]
        for name, windows in texts.items():
            m = evaluate_windows(model, windows, reference, desc=f"{label} {what} on {name}")
            row += [fmt(m.ppl / m.reference_ppl, ".4f"), fmt(m.kl, ".4f")]
        rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
    header = ["scheme", "quantized"] + [f"{name} {col}" for name in texts for col in ("ppl ratio", "KL")]
    print(f"\n{args.windows} x 512 tokens per text; dynamic per-token inputs, per-channel weights, lm_head in float\n")
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
