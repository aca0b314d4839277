"""Do transformers (with compressed-tensors) and quantmill's own loader give the same logits for
every quantized checkpoint in the store? Prints one row per checkpoint: max |logit difference|
over the first eval windows. With --compressed-tensors-grid, quantmill's dynamic int8 inputs use
compressed-tensors' grid (quantmill.nn.quant_linear.compressed_tensors_dynamic_int8) instead of vLLM's: the
difference left is then the loaders', not the grids'.

    QUANTMILL_HOME=/tmp/qmdemo .venv/bin/python bench/loader_agreement.py [--windows 2] [--recipe NAME ...] [--compressed-tensors-grid]
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
    from quantmill.io.checkpoint import load_quantized
    from quantmill.io.llm_int8_checkpoint import is_llm_int8
    from quantmill.nn.quant_linear import QuantLinear, compressed_tensors_dynamic_int8
    from quantmill.io.sources import load_tokenizer
    from quantmill.tasks.store import default_root

    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--recipe", action="append", help="only these recipes' checkpoints")
    parser.add_argument("--compressed-tensors-grid", action="store_true", help="quantmill's dynamic int8 inputs on compressed-tensors' grid")
    args = parser.parse_args()
    if args.compressed_tensors_grid:
        vllm_grid = QuantLinear.fake_quantize_input

        def grid(self, x2):
            dynamic_int8 = (self.scheme.act, self.scheme.act_type) == ("dynamic", "int")
            return compressed_tensors_dynamic_int8(self, x2) if dynamic_int8 else vllm_grid(self, x2)

        QuantLinear.fake_quantize_input = grid
    root = default_root()
    rows = []
    for manifest in sorted((root / "quantize").glob("*/manifest.json")):
        entry = manifest.parent
        recipe = json.loads(manifest.read_text())["recipe"]["name"]
        folder = entry / "checkpoint"
        if args.recipe and recipe not in args.recipe:
            continue
        if is_llm_int8(folder):
            print(f"{recipe:<28} {entry.name[:12]}  quantmill-llm-int8: transformers has no loader for it", flush=True)
            continue
        tokenizer = load_tokenizer(folder)
        windows = first_windows(tokenize_prefix(tokenizer, load_text(parse_spec("stdlib:eval")), args.windows * args.seq_len), args.windows, args.seq_len)
        served = AutoModelForCausalLM.from_pretrained(folder).eval()
        ours = load_quantized(folder)
        with torch.no_grad():
            diff = max((served(w[None]).logits - ours(w[None]).logits).abs().max().item() for w in windows)
            scale = max(ours(w[None]).logits.abs().max().item() for w in windows)
        rows.append((recipe, entry.name[:12], diff, scale))
        print(f"{recipe:<28} {entry.name[:12]}  max |diff| {diff:.3e}  (max |logit| {scale:.1f})", flush=True)


if __name__ == "__main__":
    main()
