"""quantmill against the peer tools, same scheme, same model, same evaluation windows.

Each row pairs a quantmill recipe with the peer configuration that computes the same scheme:

  w8a16-rtn      torchao Int8WeightOnlyConfig()                       int8 per-channel weights
  w4a16-rtn-g64  torchao IntxWeightOnlyConfig(int4, PerGroup(64))     int4 symmetric groups of 64
  w8a8-dynamic   torchao Int8DynamicActivationInt8WeightConfig(act_mapping_type=ASYMMETRIC)
                                                                      int8 per-channel W, per-token X with a zero point
  w8a8-dynamic-sym  torchao Int8DynamicActivationInt8WeightConfig()   int8 per-channel W, per-token X (absmax)
  fp8-dynamic-rtn  torchao Float8DynamicActivationFloat8WeightConfig(PerRow())   (fp8-dynamic is GPTQ'd)
  w8-llmint8-t6-absmax  bitsandbytes Linear8bitLt(threshold=6.0)      LLM.int8() decomposition, absmax
                                                                      (w8-llmint8-t6 is the zeropoint variant)

quantmill's numbers come from the quantize flow (cached stages are reused); the peer's model is
quantized in memory from the same float checkpoint (lm_head left in float, as in every recipe)
and scored by quantmill.eval.evaluate.evaluate_windows on the same windows, against the same float model.
So a difference between the two columns is a difference between the implementations, not the
protocol. A peer that cannot run here (no kernel on this device) gets a row saying why.

The peers are not dependencies of quantmill: `make bench-peers` builds .venv-peers, a venv that
sees the project's venv (a .pth file) and adds torchao and bitsandbytes.

Run (reusing the cached demo store):
    QUANTMILL_HOME=/tmp/qmdemo PREFECT_HOME=/tmp/phdemo .venv-peers/bin/python bench/peers.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tables import fmt, table  # noqa: E402


def _not_lm_head(module, fqn: str) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) and not fqn.endswith("lm_head")


def torchao_peer(make_config: Callable[[], object]) -> Callable:
    def apply(model):
        from torchao.quantization import quantize_

        quantize_(model, make_config(), filter_fn=_not_lm_head)
        return model.eval()

    return apply


def bnb_llm_int8(threshold: float) -> Callable:
    """Every Linear but lm_head -> bitsandbytes Linear8bitLt (int8 weights, outlier columns >= threshold in float)."""

    def apply(model):
        import bitsandbytes as bnb

        names = [n for n, m in model.named_modules() if _not_lm_head(m, n)]
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            lin = getattr(owner, child)
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False, threshold=threshold)
            q.load_state_dict(lin.state_dict())
            setattr(owner, child, q.to(lin.weight.device))  # .to() quantizes the weight (CB, SCB)
        # eval(), after the swap: a Linear8bitLt in training mode runs on the CPU as MatMul8bitFp
        # (de-quantized weights, float inputs), i.e. W8A16, not the LLM.int8() decomposition.
        return model.eval()

    return apply


def peers() -> dict[str, tuple[str, Callable]]:
    """quantmill recipe -> (peer label, function quantizing a float model in place)."""
    import torch

    def int4_g64():
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))

    def int8_wo():
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()

    def w8a8():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()

    def w8a8_asym():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType

        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)

    def fp8():
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())

    return {
        "w8a16-rtn": ("torchao Int8WeightOnlyConfig()", torchao_peer(int8_wo)),
        "w4a16-rtn-g64": ("torchao IntxWeightOnlyConfig(int4, PerGroup(64))", torchao_peer(int4_g64)),
        "w8a8-dynamic": ("torchao Int8DynamicActivationInt8WeightConfig(act_mapping_type=ASYMMETRIC)", torchao_peer(w8a8_asym)),
        "w8a8-dynamic-sym": ("torchao Int8DynamicActivationInt8WeightConfig()", torchao_peer(w8a8)),
        "fp8-dynamic-rtn": ("torchao Float8DynamicActivationFloat8WeightConfig(PerRow())", torchao_peer(fp8)),
        "w8-llmint8-t6-absmax": ("bitsandbytes Linear8bitLt(threshold=6.0)", bnb_llm_int8(6.0)),
    }


def versions() -> str:
    import importlib.metadata as md

    out = []
    for dist in ("torch", "transformers", "torchao", "bitsandbytes"):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--only", nargs="*", help="quantmill recipes to compare (default: every pair)")
    parser.add_argument("--windows", type=int, default=None, help="eval windows (default: the flow's, 32)")
    parser.add_argument("--eval", default=None, help="evaluation dataset spec (default: the flow's, stdlib:eval)")
    args = parser.parse_args(argv)

    from quantmill.flows.quantize import quantize_flow
    from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
    from quantmill.eval.evaluate import evaluate_windows
    from quantmill.io.sources import load_model, load_tokenizer
    from quantmill.tasks.calibrate import EvaluationSpec
    from quantmill.tasks.store import Store

    pairs = peers()
    chosen = args.only or list(pairs)
    unknown = [r for r in chosen if r not in pairs]
    if unknown:
        print(f"error: no peer for {unknown}; known: {list(pairs)}", file=sys.stderr)
        return 2
    spec = EvaluationSpec(**{k: v for k, v in (("windows", args.windows), ("dataset", args.eval)) if v is not None})
    summary = quantize_flow(model=args.model, recipes=chosen, evaluation=spec)
    ours = {r["recipe"]: r for r in summary["rows"]}
    model_dir = Store().get("resolve_model", summary["model_key"]).path / "checkpoint"
    text = load_text(parse_spec(spec.dataset))
    windows = first_windows(tokenize_prefix(load_tokenizer(model_dir), text, spec.windows * spec.seq_len), spec.windows, spec.seq_len)
    reference = load_model(model_dir).eval()
    fp_ppl = summary["reference"]["ppl"]

    header = ["recipe", "tool", "ppl", "ppl ratio", "KL", "top-1 agree", "quant s", "eval s"]
    rows = [["float (reference)", "-", fmt(fp_ppl, ".3f"), "1.0000", "-", "-", "-", "-"]]
    for recipe in chosen:
        label, apply = pairs[recipe]
        r = ours[recipe]
        rows.append([recipe, "quantmill", fmt(r["ppl"], ".3f"), fmt(r["ppl_ratio"], ".4f"), fmt(r["kl"], ".4f"),
                     fmt(r["top1_agreement"], ".4f"), fmt(r["quantize_seconds"], ".1f"), "-"])
        start = time.perf_counter()
        try:
            peer = apply(load_model(model_dir).eval())
            quant_s = time.perf_counter() - start
            m = evaluate_windows(peer, windows, reference, desc=f"eval {label}")
        except Exception as err:  # a peer without a kernel for this device: say so, go on
            rows.append([recipe, label, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}", "", "", "", "", ""])
            continue
        rows.append([recipe, label, fmt(m.ppl, ".3f"), fmt(m.ppl / fp_ppl, ".4f"), fmt(m.kl, ".4f"),
                     fmt(m.top1_agreement, ".4f"), fmt(quant_s, ".1f"), fmt(m.seconds, ".1f")])
        del peer
    print(f"\n{args.model}: {spec.windows} x {spec.seq_len} tokens of {spec.dataset}; {versions()}")
    print("quant s: quantmill's quantize stage, or the peer's in-memory quantization of the loaded float model;")
    print("eval s: the peer's quantized and float forward passes over the windows\n")
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
