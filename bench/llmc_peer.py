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

SCHEMES = ("w8-channel-rtn", "w4-g64-rtn", "w4-g64-gptq", "w4-channel-gptq", "w4-g64-awq", "w8a8-dynamic", "fp8-dynamic")
# compressed-tensors' presets, as llm-compressor's own W8A8 and FP8 examples name them: int8 weights per
# channel (symmetric) with int8 inputs per token at run time (symmetric, absmax / 127.5); fp8 e4m3
# weights per channel with fp8 inputs per token at run time. Both rounded by QuantizationModifier
# (RTN; FP8_DYNAMIC needs no calibration data, its examples run it so).
PRESETS = {"w8a8-dynamic": "W8A8", "fp8-dynamic": "FP8_DYNAMIC"}


def recipe_for(scheme: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if scheme in PRESETS:
        return [QuantizationModifier(targets=["Linear"], scheme=PRESETS[scheme], ignore=["lm_head"])]
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


def cpu_only_pinning() -> None:
    """llm-compressor 0.14's AWQ pins its cached block inputs (`IntermediatesCache.pin_memory`, called
    before each mapping's grid search) so that later host-to-accelerator copies can be non-blocking.
    Pinning needs an accelerator: on a CPU-only machine `Tensor.pin_memory()` raises and AWQ stops
    before its first mapping. Without an accelerator nothing is ever copied to a device (the
    onload target is the CPU), so skipping the pinning changes no number: the pin becomes a no-op
    there, and only there (with an accelerator this function leaves llm-compressor untouched)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


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

    cpu_only_pinning()
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
