"""quantmill's own methods on a synthetic Llama-3-8B-shaped model: time per block, total, peak
device memory and peak host memory (issue 19, item 5).

    python3 bench/gpu.py --device cuda --blocks 3          # on a GPU (bench/device_check.sh runs this)
    .venv/bin/python bench/gpu.py --shape tiny --device cpu --calib-samples 16 --seq-len 64

What it runs: the library calls the pipeline's stages make, not a re-implementation.
- `stats`: `quantmill.model.stats.collect_stats` on the float model (batch 8, as quantmill/tasks/stats.py), the
  collect_stats stage's work; rtn's clip search and smoothquant read these statistics.
- one row per method: `quantmill.methods.registry.REGISTRY[recipe.method].run(MethodContext(...))`, the call
  quantmill/tasks/quantize.py makes, with a partial folder as the stage has (each block's result and the
  next block's inputs written to disk; `--no-partial` leaves that out). The recipes are the
  built-in ones with the group size set to `--group-size` (128 by default):
  w4a16-rtn-g64, w4a16-gptq-g64, w4a16-awq-g64 become ...-g128; smoothquant is
  w8a8-smoothquant-auto (alpha searched per block, W8A8 int8, per-channel weights).
Not timed: loading a checkpoint from disk and writing the quantized one (the stage's load_model
and save_quantized), and the calibration stage.

The model: transformers' LlamaConfig / LlamaForCausalLM built on the meta device, then materialised
part by part (embeddings, each decoder block, norm, lm_head) with seeded random weights (normal,
std 0.02; norms 1), in float32 by default, the dtype the quantize stage loads (quantmill.io.sources.
load_model). `--blocks k` builds only the first k of the shape's decoder blocks: every block has
the same shape, so the totals for the whole shape are extrapolated and the table says so.
The calibration set is N x L token ids drawn uniformly at random over the vocabulary (seeded):
enough for timing and memory, meaningless for quality. Each method starts from the same float
weights (restored from a copy between rows).

Columns. Linears: the Linears quantized (stats: the Linear inputs recorded). s/block: mean wall
time between the engine's per-block callbacks, after the first block (the first also holds the
capture of block 0's inputs and any warm-up; with one block it is used as is). This includes the
partial-folder writes. total: the method call's wall time. total@FULL: extrapolated to every block
of the shape = the measured blocks + (FULL - k) x s/block + the time outside the blocks x FULL / k
(that time, e.g. smoothquant's final RTN pass over every Linear, grows with the number of blocks);
for rtn, which does not walk blocks, total x FULL / k. device peak:
torch.cuda.max_memory_allocated over the row. budget: issue 19's target for the peak device
memory, one decoder block's weights + the calibration activations (N x L x hidden in the model's
dtype) + 2 GB. host peak: the process's peak resident set over the row (Linux VmHWM, reset before
each row), which includes the float model's host copy and the bench's copy of the blocks' float
weights (host base, the resident set when the row starts). GB are 10^9 bytes. rtn quantizes where
the model lies, on the host, whatever --device says (quantmill/methods/rtn.py), as does smoothquant's
final RTN pass: on a GPU machine those rows time its CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

from quantmill.core.threads import prefer_passive_waits  # noqa: E402

prefer_passive_waits()  # before torch (quantmill/core/threads.py says why)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.gptq import peak_mb, reset_peak, rss_mb  # noqa: E402
from bench.tables import fmt, table  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # Meta-Llama-3-8B's config.json: hidden 4096, 32 blocks, GQA 32 heads / 8 kv heads, MLP 14336.
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0,  # LlamaConfig turns it into rope_parameters
    ),
    # Small enough for a CPU test; widths divisible by 128 so the g128 recipes apply unchanged.
    "tiny": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=500000.0,  # LlamaConfig turns it into rope_parameters
    ),
}
# method -> the built-in recipe it runs (group size replaced by --group-size where it has groups)
METHOD_RECIPES = {"rtn": "w4a16-rtn-g64", "gptq": "w4a16-gptq-g64", "awq": "w4a16-awq-g64", "smoothquant": "w8a8-smoothquant-auto"}
STATS_BATCH_SIZE = 8  # quantmill/tasks/stats.py's BATCH_SIZE (importing tasks/ would need prefect)
BUDGET_SLACK_BYTES = 2e9  # issue 19: "one decoder block's weights + the calibration activations + 2 GB"
GB = 1e9


# ---------------------------------------------------------------- the synthetic model

def build_model(shape: str, blocks: int, dtype: torch.dtype, seed: int) -> nn.Module:
    """A LlamaForCausalLM of the shape with its first `blocks` decoder blocks, built on the meta
    device and materialised one part at a time (never two float copies of a part)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": blocks}, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    parts = [("model.embed_tokens", model.model.embed_tokens)]
    parts += [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    parts += [("model.norm", model.model.norm), ("lm_head", model.lm_head)]
    with torch.no_grad():
        for prefix, module in parts:
            module.to_empty(device="cpu")
            for name, p in module.named_parameters():
                full = f"{prefix}.{name}"
                if "norm" in full:
                    p.fill_(1.0)
                else:  # one generator per tensor: block i's weights do not depend on --blocks
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full.encode()))
                    p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers are computed, not loaded
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device: {left[:4]}")
    return model.eval()


def block_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights of the decoder blocks (the methods change them in place), copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("model.layers.")}


def restore_params(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in saved.items():
            params[n].copy_(value)


def bench_recipe(method: str, group_size: int):
    from quantmill.methods.recipe import Recipe
    from quantmill.methods.recipe_files import load_recipe

    recipe = load_recipe(METHOD_RECIPES[method])
    body = recipe.model_dump(mode="json")
    if recipe.weights.granularity == "group":
        body["weights"]["group_size"] = group_size
        body["name"] = recipe.name.replace(f"-g{recipe.weights.group_size}", f"-g{group_size}")
    return Recipe.model_validate(body)


# ---------------------------------------------------------------- measuring one row

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(label: str, recipe_name: str, device: torch.device, blocks: int, full_blocks: int, work) -> dict[str, Any]:
    """Run `work(on_block_done)` once; its wall time, per-block callback intervals and peaks."""
    from quantmill.model.sequential import release_host_memory

    gc.collect()
    release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = rss_mb()
    host_reset = reset_peak()
    marks: list[float] = []
    _sync(device)
    start = time.perf_counter()
    out = work(lambda i, n, meta: marks.append(time.perf_counter()))
    _sync(device)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "row": label, "recipe": recipe_name, "blocks": blocks, "full_blocks": full_blocks, "total_s": seconds,
        "device_peak_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
        "host_peak_gb": peak_mb() * 1e6 / GB, "host_base_gb": base_mb * 1e6 / GB, "host_peak_reset": host_reset,
        "modules": out,  # Linears quantized (stats: Linear inputs recorded)
    }
    if marks:
        intervals = [b - a for a, b in zip([start] + marks, marks)]
        steady = intervals[1:] or intervals
        per_block = sum(steady) / len(steady)
        outside = seconds - sum(intervals)
        row.update({
            "block_s": intervals, "s_per_block": per_block, "first_block_s": intervals[0],
            "total_full_s": sum(intervals) + (full_blocks - len(intervals)) * per_block + outside * full_blocks / blocks,
        })
    else:  # no block walk (rtn): everything is per Linear
        row.update({"block_s": [], "s_per_block": seconds / blocks, "first_block_s": None, "total_full_s": seconds * full_blocks / blocks})
    return row


# ---------------------------------------------------------------- the bench

def run(args: argparse.Namespace, on_row=None) -> dict[str, Any]:
    """The stats row, then one row per method; `on_row(result so far)` after each row."""
    from quantmill.methods.base import MethodContext
    from quantmill.methods.registry import REGISTRY
    from quantmill.model.sequential import pick_device
    from quantmill.model.stats import collect_stats
    import transformers

    shape = SHAPES[args.shape]
    full_blocks = shape["num_hidden_layers"]
    blocks = args.blocks or full_blocks
    if not 1 <= blocks <= full_blocks:
        raise SystemExit(f"--blocks must be in 1..{full_blocks}")
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    from transformers import LlamaForCausalLM  # noqa: F401  (imported outside the build's time)

    t0 = time.perf_counter()
    model = build_model(args.shape, blocks, dtype, args.seed)
    build_s = time.perf_counter() - t0
    floats = block_params(model)
    ids = torch.randint(0, shape["vocab_size"], (args.calib_samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    elt = torch.empty((), dtype=dtype).element_size()
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    act_bytes = args.calib_samples * args.seq_len * shape["hidden_size"] * elt
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    full_model_bytes = model_bytes + (full_blocks - blocks) * block_bytes
    if device.type == "cuda":  # context, cuBLAS handle: outside every row
        x = torch.randn(512, 512, device=device)
        (x @ x).sum().item()
    work_root = Path(tempfile.mkdtemp(prefix="quantmill-gpu-bench-", dir=args.workdir))

    rows: list[dict[str, Any]] = []

    def partial(label: str) -> Path | None:
        return None if args.no_partial else work_root / label / "partial"

    result = {
        "shape": args.shape, "config": dict(shape), "blocks": blocks, "full_blocks": full_blocks,
        "dtype": args.dtype, "calib_samples": args.calib_samples, "seq_len": args.seq_len, "calibration": "random token ids (uniform, seeded)",
        "seed": args.seed, "group_size": args.group_size, "partial_folder": not args.no_partial,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "build_s": build_s,
        "block_weights_gb": block_bytes / GB, "calib_activations_gb": act_bytes / GB,
        "device_budget_gb": (block_bytes + act_bytes + BUDGET_SLACK_BYTES) / GB,
        "model_host_gb": model_bytes / GB, "full_model_host_gb": full_model_bytes / GB,
        "rows": rows, "complete": False,
    }
    try:
        stats_holder: dict[str, Any] = {}

        def stats_work(done):
            stats_holder["stats"] = collect_stats(model, ids, device, batch_size=STATS_BATCH_SIZE, partial_dir=partial("stats"), on_block_done=done)
            return len(stats_holder["stats"])

        rows.append(measure("stats", "collect_stats", device, blocks, full_blocks, stats_work))
        _row_done(result, on_row)
        for method in args.methods:
            recipe = bench_recipe(method, args.group_size)
            restore_params(model, floats)

            def work(done, recipe=recipe, method=method):
                ctx = MethodContext(model=model, recipe=recipe, stats=stats_holder["stats"], calibration=ids, device=device, partial_dir=partial(method), on_block_done=done)
                return len(REGISTRY[recipe.method].run(ctx).weights)

            rows.append(measure(method, recipe.name, device, blocks, full_blocks, work))
            _row_done(result, on_row)
            shutil.rmtree(work_root / method, ignore_errors=True)
        result["complete"] = True
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    return result


def _row_done(result: dict[str, Any], on_row) -> None:
    row = result["rows"][-1]
    print(f"[gpu bench] {row['row']}: {row['total_s']:.1f} s over {row['blocks']} block(s)", file=sys.stderr, flush=True)
    if on_row is not None:
        on_row(result)


def render(result: dict[str, Any]) -> str:
    c, k, full = result["config"], result["blocks"], result["full_blocks"]
    sliced = k < full
    lines = [
        f"quantmill GPU bench, {result['date']}: {result['shape']} shape (hidden {c['hidden_size']}, {full} blocks, "
        f"heads {c['num_attention_heads']}/{c['num_key_value_heads']} kv, MLP {c['intermediate_size']}, vocab {c['vocab_size']}), "
        f"{result['dtype']} weights, random (seeded)",
        (f"built: {k} of {full} decoder blocks (a slice: total@{full} is extrapolated, see bench/gpu.py)" if sliced else f"built: all {full} decoder blocks")
        + f"; model on the host {result['model_host_gb']:.2f} GB ({result['full_model_host_gb']:.2f} GB with all {full} blocks); built in {result['build_s']:.1f} s",
        f"calibration: {result['calib_samples']} x {result['seq_len']} random token ids (uniform over the vocabulary, seed {result['seed']}): timing and memory only, the quantized numbers mean nothing",
        f"device: {result['device']} ({result['device_name']}), {result['cpu_count']} CPUs, torch {result['torch']}, transformers {result['transformers']}; "
        + ("partial folder written on the save schedule, as the quantize stage does" if result["partial_folder"] else "no partial folder (--no-partial)"),
        f"device memory budget (issue 19): block weights {result['block_weights_gb']:.3f} GB + calibration activations "
        f"{result['calib_activations_gb']:.3f} GB + 2 GB = {result['device_budget_gb']:.3f} GB",
        "",
    ]
    budget = result["device_budget_gb"]
    header = ["row", "recipe", "blocks", "Linears", "s/block", "first block s", "total s", f"total@{full} s" + (" (extrap.)" if sliced else ""),
              "device peak GB", "budget GB", "host peak GB", "host base GB"]
    body = []
    for r in result["rows"]:
        peak = r["device_peak_gb"]
        mark = "" if peak is None else (" ok" if peak <= budget else " OVER")
        body.append([r["row"], r["recipe"], str(r["blocks"]), str(r["modules"]), fmt(r["s_per_block"], ".2f"), fmt(r["first_block_s"], ".2f"), fmt(r["total_s"], ".1f"),
                     fmt(r["total_full_s"], ".1f"), fmt(peak, ".2f") + mark, f"{budget:.2f}", fmt(r["host_peak_gb"], ".2f"), fmt(r["host_base_gb"], ".2f")])
    lines.append(table(header, body))
    if not result.get("complete", True):
        lines.append("note: INCOMPLETE run (stopped before every row finished): the rows above are the ones done")
    if any(not r["host_peak_reset"] for r in result["rows"]):
        lines.append("note: /proc/self/clear_refs unavailable: host peaks are the process's peak so far")
    if result["device"] == "cpu" or result["device"].startswith("cpu"):
        lines.append("note: run on the CPU: no device memory; device peak '-'")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when present)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--blocks", type=int, default=None, help="build only the first k decoder blocks; totals extrapolated (default: all)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHOD_RECIPES),
                   help=f"comma-separated, of {','.join(METHOD_RECIPES)} (the stats row always runs)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the model's dtype (the quantize stage loads float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-partial", action="store_true", help="no per-block partial folder (the quantize stage always writes one)")
    p.add_argument("--workdir", default=None, help="where the partial folders go (default: the system's temp folder)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH ('-': print JSON instead of the table)")
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHOD_RECIPES]
    if bad:
        p.error(f"unknown method(s) {bad} (known: {', '.join(METHOD_RECIPES)})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    save = None
    if args.json and args.json != "-":  # rewritten after every row: a run cut short keeps its rows
        save = lambda result: Path(args.json).write_text(json.dumps(result, indent=1))  # noqa: E731
    result = run(args, save)
    print(json.dumps(result, indent=1) if args.json == "-" else render(result))


if __name__ == "__main__":
    main()
