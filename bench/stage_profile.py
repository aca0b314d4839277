"""Each stage's time against one plain forward pass over the same tokens, and where it goes.

    .venv/bin/python bench/stage_profile.py --samples 16 --seq-len 512 --blocks 6 --profile

On the demo model (de-quantized to float32 once, as bench/vs_llmcompressor.py does; `--model DIR`
takes any float checkpoint folder) cut to its first `--blocks` decoder blocks, over the same
calibration token ids (`stdlib:calib`, seed 0):
- `forward`: the sequential engine walking the blocks with nothing to do but the forward pass
  (block 0's inputs captured, each block run once over every batch): the floor of every stage;
- `stats`: the statistics stage (quantmill.model.stats.collect_stats);
- one row per `--recipes` entry: the method as the quantize stage calls it (stats passed in).
The ratio column is each row's time over `forward`. `--profile` prints cProfile's top functions
by own time for each row, which is how the time in GPTQ was split in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
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


def truncated_model(folder: Path, blocks: int):
    from quantmill.model.arch import decoder_layers
    from quantmill.io.sources import load_model

    model = load_model(folder)
    layers = decoder_layers(model)
    del layers[blocks:]
    model.config.num_hidden_layers = len(layers)
    return model


def timed(fn, profile: bool) -> tuple[float, str]:
    """(seconds, cProfile's top 14 by own time or "")."""
    prof = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if prof:
        prof.enable()
    fn()
    if prof:
        prof.disable()
    seconds = time.perf_counter() - start
    if not prof:
        return seconds, ""
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    return seconds, "\n".join(lines[lines.index(next(line for line in lines if "ncalls" in line)):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a float checkpoint folder (default: the demo model, de-quantized)")
    ap.add_argument("--work", default="/tmp/quantmill-stage-profile", help="where the float demo model and ids are kept")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=6, help="decoder blocks kept (the first N)")
    ap.add_argument("--recipes", nargs="*", default=["w8a16-rtn", "w4a16-rtn-g64", "w4a16-gptq-g64", "w4a16-awq-g64"])
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions per row")
    args = ap.parse_args()

    from quantmill.methods.base import MethodContext
    from quantmill.methods.registry import REGISTRY
    from quantmill.methods.recipe_files import load_recipe
    from quantmill.model.sequential import run_sequential
    from quantmill.model.stats import collect_stats

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = float_checkpoint(work, args.model)
    _, ids = calibration_ids(folder, work, args.samples, args.seq_len)
    cpu = torch.device("cpu")
    rows: list[tuple[str, float, str]] = []

    model = truncated_model(folder, args.blocks)
    rows.append(("forward", *timed(lambda: run_sequential(model, ids, lambda i, b, x, fwd: ({}, {}, None), device=cpu, desc="forward"), args.profile)))
    holder: dict = {}
    rows.append(("stats", *timed(lambda: holder.update(stats=collect_stats(model, ids, cpu)), args.profile)))
    for name in args.recipes:
        recipe = load_recipe(name)
        model = truncated_model(folder, args.blocks)  # every method starts from the float weights
        ctx = MethodContext(model=model, recipe=recipe, stats=holder["stats"], calibration=ids, device=cpu)
        rows.append((name, *timed(lambda: REGISTRY[recipe.method].run(ctx), args.profile)))

    base = rows[0][1]
    print(f"{args.blocks} blocks of {folder.name}, {args.samples} x {args.seq_len} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table(["row", "seconds", "x forward"], [[name, f"{s:.1f}", f"{s / base:.2f}"] for name, s, _ in rows]))
    for name, _, top in rows:
        if top:
            print(f"\n## {name}\n{top}")


if __name__ == "__main__":
    main()
