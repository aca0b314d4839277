"""llm-compressor's side of bench/vs_llmcompressor.py. Runs in .venv-llmc (`make bench-llmc`), never
in quantmill's venv, and imports nothing of quantmill: it reads the float checkpoint folder and the
calibration token ids from files, quantizes with `oneshot`, saves a compressed-tensors checkpoint and
prints one JSON line {"seconds": ...} (the `oneshot` call alone, as quantmill's row times its method).

    .venv-llmc/bin/python bench/llmc_peer.py --model FLOAT_DIR --calib ids.pt --scheme w4-g64-gptq --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore")

SCHEMES = ("w8-channel-rtn", "w4-g64-rtn", "w4-g64-gptq", "w4-channel-gptq", "w4-g64-awq")


def recipe_for(scheme: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    bits = 8 if scheme.startswith("w8") else 4
    strategy = "group" if "-g64-" in scheme else "channel"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=64 if strategy == "group" else None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    if scheme.endswith("-rtn"):
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if scheme.endswith("-gptq"):
        # Its defaults: block 128, dampening 0.01, act-order "static" (no g_idx), as quantmill's recipes.
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01)]
    if scheme.endswith("-awq"):
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQ only scales (its own grid search, n_grid 20, duo scaling); the QuantizationModifier after
        # it rounds the scaled weights (RTN), as its examples do.
        return [AWQModifier(n_grid=20), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    raise SystemExit(f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="torch.save'd int64 tensor [N, L] of token ids")
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.load(args.calib)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model, dataset=data, recipe=recipe_for(args.scheme), max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
