"""quantmill against llm-compressor on the same work: the same float checkpoint, the same calibration
token ids, the same held-out windows, one scoring script.

    make bench-llmc BENCH_LLMC_ARGS="--work /tmp/qm21/llmc"
    # = nice -n 10 .venv/bin/python bench/vs_llmcompressor.py --peer-python .venv-llmc/bin/python --work DIR

1. The demo model (SmolLM2-135M) is de-quantized once into a float32 safetensors folder (`--model`
   takes any local float checkpoint folder instead); the calibration ids are quantmill's own
   (`stdlib:calib`, 64 x 512, seed 0: the calibration stage's sampling) and go to llm-compressor
   as a file (`calib_ids.pt`), so both tools see the same tokens.
2. Each row quantizes with quantmill in this process (load, method, save: the stage's work without
   the store; the method alone is timed, as the peer's `oneshot` is; the activation stats are
   computed once and timed on their own) and with
   llm-compressor in a subprocess of .venv-llmc (bench/llmc_peer.py, its `oneshot` timed). The
   peer's runs go one after another in a worker thread while quantmill's rows run, so the two
   tools quantize at the same time under the same machine load (on 2 cores each gets about one).
3. Every checkpoint (both tools') is loaded by transformers in this venv and scored on the same
   windows of the held-out text: ppl, KL(P_float || P_quant) per token and top-1 agreement, the float
   model's log-probabilities computed once. The default held-out text is bench/data/heldout.txt
   (licence texts, see its header): no recipe was chosen on it. `--eval stdlib:eval` (or any
   quantmill dataset spec) scores on another text.

`--rows` picks rows and their order (both tools run them in that order); `--extra NAME=RECIPE` adds quantmill-only rows (a recipe name or file), where
RECIPE@restricted uses the old 15-level grid (scale absmax / qmax), RECIPE@full the full grid at 8 bits
too, for ablations. Results also go
to WORK/results.json. Each row prints a JSON line with quantmill's half as soon as it is scored, then
the whole row once llm-compressor's checkpoint is scored too (`--table` keeps a row's last line), so
quantmill never waits for the peer mid-table. The stats stage runs only if a row's recipe reads
the stats (RTN's clipping search, static input scales, SmoothQuant, LLM.int8()'s report); GPTQ,
AWQ and dynamic-input RTN do not. A failing peer (llm-compressor's AWQ on a CPU) is a row with its error line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

from quantmill.core.threads import prefer_passive_waits  # noqa: E402

prefer_passive_waits()  # before torch, for both tools (quantmill/core/threads.py says why)

HELDOUT = REPO / "bench" / "data" / "heldout.txt"
# (row, quantmill recipe, llm-compressor scheme of bench/llmc_peer.py)
ROWS = [
    ("W8 per channel, RTN", "w8a16-rtn", "w8-channel-rtn"),
    ("W4 g64, RTN", "w4a16-rtn-g64", "w4-g64-rtn"),
    ("W4 g64, GPTQ", "w4a16-gptq-g64", "w4-g64-gptq"),
    ("W4 per channel, GPTQ", "w4a16-gptq", "w4-channel-gptq"),
    ("W4 g64, AWQ", "w4a16-awq-g64", "w4-g64-awq"),
    # 8-bit inputs: quantmill's W8A8 takes each token's [min, max] with a zero point, its FP8 runs
    # GPTQ on the e4m3 grid (the table); llm-compressor's are its W8A8 / FP8_DYNAMIC presets
    # (symmetric per-token inputs, RTN weights). Same-scheme quantmill rows for both:
    # --extra "...=w8a8-dynamic-sym" --extra "...=fp8-dynamic-rtn".
    ("W8A8 int8 dynamic", "w8a8-dynamic", "w8a8-dynamic"),
    ("FP8 dynamic", "fp8-dynamic", "fp8-dynamic"),
]


def float_checkpoint(work: Path, model: str | None) -> Path:
    from quantmill.io.sources import convert_gguf, fetch_demo_gguf

    if model:
        return Path(model)
    folder = work / "float"
    if not (folder / "config.json").is_file():
        home = Path(os.environ.get("QUANTMILL_HOME", Path.home() / ".cache" / "quantmill"))
        convert_gguf(fetch_demo_gguf(home / "downloads"), folder)
    return folder


def calibration_ids(folder: Path, work: Path, samples: int, seq_len: int):
    import torch

    from quantmill.model.calibration import load_text, pack_samples, parse_spec, tokenize
    from quantmill.io.sources import load_tokenizer

    path = work / f"calib_ids_{samples}x{seq_len}.pt"
    if not path.is_file():
        tokens = tokenize(load_tokenizer(folder), load_text(parse_spec("stdlib:calib")))
        torch.save(pack_samples(tokens, samples, seq_len, 0, what="calibration text stdlib:calib"), path)
    return path, torch.load(path)


def eval_windows(folder: Path, spec: str, windows: int, seq_len: int):
    from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
    from quantmill.io.sources import load_tokenizer

    text = HELDOUT.read_text() if spec == "heldout" else load_text(parse_spec(spec))
    return first_windows(tokenize_prefix(load_tokenizer(folder), text, windows * seq_len), windows, seq_len)


def log_probs(model, windows):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        return [F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1].float(), dim=-1) for w in windows]


def score(folder: Path, windows, reference: list) -> dict:
    """ppl, KL(P_float || P_quant) per token, top-1 agreement of a checkpoint loaded by transformers."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll = kl = agree = count = 0.0
    with torch.no_grad():
        for w, ref in zip(windows, reference):
            logp = F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0, :-1].float(), dim=-1)
            targets = w[1:]
            nll += -logp.gather(1, targets[:, None]).sum().item()
            kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            count += targets.numel()
    del model
    gc.collect()
    return {"ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count}


def quantmill_quantize(folder: Path, ref: str, calibration, stats, out: Path) -> float:
    """quantmill's quantize stage without the store: load, method, save. Returns the method's
    seconds: the span the peer's `oneshot` covers (its model is loaded before and saved after)."""
    import torch

    import quantmill.core.grid as grid
    from quantmill.io.checkpoint import save_quantized
    from quantmill.methods.base import MethodContext
    from quantmill.methods.registry import REGISTRY
    from quantmill.methods.recipe_files import load_recipe
    from quantmill.io.sources import load_model

    name, _, variant = ref.partition("@")
    recipe = load_recipe(name)
    full_range = grid.weight_full_range
    if variant == "restricted":  # ablation: the pre-issue-21 grid (absmax / qmax, 15 levels at 4 bits)
        grid.weight_full_range = lambda bits: False
    elif variant == "full":  # ablation: the full grid at every width (8 bits included)
        grid.weight_full_range = lambda bits: True
    try:
        net = load_model(folder)
        start = time.perf_counter()
        ctx = MethodContext(model=net, recipe=recipe, stats=stats, calibration=calibration, device=torch.device("cpu"))
        result = REGISTRY[recipe.method].run(ctx)
        seconds = time.perf_counter() - start
        save_quantized(net, result.weights, recipe, out, {"bench": "vs_llmcompressor"}, tokenizer_dir=folder,
                       input_qparams=result.input_qparams, release_weights=True)
    finally:
        grid.weight_full_range = full_range
    del net, ctx, result
    gc.collect()
    return seconds


def peer_quantize(python: str, folder: Path, calib: Path, scheme: str, out: Path, log: Path) -> tuple[float | None, str | None]:
    """llm-compressor in its own venv; (seconds, None) or (None, its last error line)."""
    cmd = [python, str(REPO / "bench" / "llmc_peer.py"), "--model", str(folder), "--calib", str(calib), "--scheme", scheme, "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    log.write_text(done.stdout + "\n" + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])["seconds"], None
    errors = [line.strip() for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    return None, (errors[-1] if errors else f"exit {done.returncode}")[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/quantmill-vs-llmc", help="scratch folder (float model, ids, checkpoints)")
    parser.add_argument("--model", help="a float checkpoint folder (default: the demo model)")
    parser.add_argument("--peer-python", default=str(REPO / ".venv-llmc" / "bin" / "python"))
    parser.add_argument("--no-peer", action="store_true", help="quantmill rows only")
    parser.add_argument("--rows", nargs="*", help="row numbers (1-based) of the default table")
    parser.add_argument("--extra", action="append", default=[], help="LABEL=RECIPE[@restricted|@full]: a quantmill-only row")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval", default="heldout", help="'heldout' (bench/data/heldout.txt) or a dataset spec")
    parser.add_argument("--eval-windows", type=int, default=12)
    parser.add_argument("--reuse", action="store_true", help="keep checkpoints already in WORK (re-score only)")
    parser.add_argument("--table", metavar="LOG", help="print the table of the JSON lines a run printed (a run cut short) and exit")
    args = parser.parse_args()
    if args.table:
        # A JSON line may follow a progress bar's carriage returns on the same line.
        lines = [json.loads(m.group(0)) for m in re.finditer(r'\{"(?:meta|row)".*\}$', Path(args.table).read_text(), re.M)]
        meta = next(line["meta"] for line in lines if "meta" in line)
        last = {line["row"]: line for line in lines if "row" in line}  # a row's whole line follows its quantmill half
        print_table(meta, list(last.values()))
        return

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from quantmill.io.sources import load_model
    from quantmill.model.stats import collect_stats, load_stats, save_stats

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = float_checkpoint(work, args.model)
    calib_path, calibration = calibration_ids(folder, work, args.calib_samples, args.seq_len)
    windows = eval_windows(folder, args.eval, args.eval_windows, args.seq_len)

    rows = [ROWS[int(i) - 1] for i in args.rows] if args.rows else list(ROWS)
    rows += [(label, ref, None) for label, _, ref in (e.partition("=") for e in args.extra)]

    # llm-compressor's runs go one after another in a worker thread (each a subprocess) while this
    # process runs quantmill's rows: both tools quantize at the same time, under the same load.
    peer_python = str(Path(args.peer_python).absolute())
    pool = ThreadPoolExecutor(max_workers=1)
    peer_jobs = {}
    # Its quick runs (RTN, no calibration pass) go first, so that they do not wait behind its GPTQ.
    for label, ref, scheme in sorted(rows, key=lambda r: not quick_peer(r[2])):
        peer_out = work / "llmcompressor" / (scheme or "")
        if scheme and not args.no_peer and not (args.reuse and (peer_out / "config.json").is_file()):
            peer_jobs[scheme] = pool.submit(peer_quantize, peer_python, folder, calib_path, scheme, peer_out, work / f"peer-{scheme}.log")
    float_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = log_probs(float_model, windows)
    nll = sum(-ref.gather(1, w[1:, None]).sum().item() for w, ref in zip(windows, reference))
    float_score = {"ppl": math.exp(nll / sum(w.numel() - 1 for w in windows))}
    del float_model
    stats_dir = work / f"stats_{args.calib_samples}x{args.seq_len}"
    start = time.perf_counter()
    stats, stats_seconds = {}, None
    if not any(needs_stats(ref) for _, ref, _ in rows):
        pass  # no row reads them: MethodContext gets none, as for a recipe without a stats stage
    elif (stats_dir / "done").is_file():  # a rerun in the same WORK reuses them (their time is the first run's)
        stats = load_stats(stats_dir)
        stats_seconds = json.loads((stats_dir / "done").read_text())["seconds"]
    else:
        stats = collect_stats(load_model(folder), calibration, torch.device("cpu"))
        stats_seconds = time.perf_counter() - start
        stats_dir.mkdir(exist_ok=True)
        save_stats(stats, stats_dir)
        (stats_dir / "done").write_text(json.dumps({"seconds": stats_seconds}))
    gc.collect()

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "eval": f"{args.eval} {args.eval_windows} x {args.seq_len}", "calibration": f"stdlib:calib {args.calib_samples} x {args.seq_len} seed 0",
        "float": float_score, "stats_seconds": stats_seconds,
    }
    print(json.dumps({"meta": meta}), flush=True)
    results, waiting = [], []

    def finish_peers(block: bool) -> None:
        """Score and print the rows whose llm-compressor run has ended (all of them with block)."""
        for row in list(waiting):
            job = peer_jobs.get(row["peer_scheme"])
            if job is not None and not (block or job.done()):
                continue
            seconds, error = job.result() if job is not None else (None, None)
            row["peer_seconds"], row["peer_error"] = seconds, error
            if error is None:
                row["peer"] = score(work / "llmcompressor" / row["peer_scheme"], windows, reference)
            waiting.remove(row)
            print(json.dumps(row), flush=True)

    for label, ref, scheme in rows:
        row = {"row": label, "quantmill_recipe": ref, "peer_scheme": scheme}
        out = work / "quantmill" / ref.replace("/", "_")
        if not (args.reuse and (out / "config.json").is_file()):
            row["quantmill_seconds"] = quantmill_quantize(folder, ref, calibration, stats, out)
        row["quantmill"] = score(out, windows, reference)
        results.append(row)
        print(json.dumps(row), flush=True)  # quantmill's half; the whole row follows once the peer's is scored
        if scheme and not args.no_peer:
            waiting.append(row)
        finish_peers(block=False)
    finish_peers(block=True)
    pool.shutdown()

    (work / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print_table(meta, results)


def quick_peer(scheme: str | None) -> bool:
    """llm-compressor schemes rounded by QuantizationModifier alone (seconds, against GPTQ's and AWQ's
    calibration passes)."""
    return bool(scheme) and (scheme.endswith("-rtn") or scheme in ("w8a8-dynamic", "fp8-dynamic"))


def needs_stats(ref: str) -> bool:
    """Whether the quantmill recipe reads the stats stage's output: RTN with its clipping search or
    static input scales, and the methods built on the stats (SmoothQuant, LLM.int8()'s report).
    GPTQ and AWQ collect what they need on the calibration ids themselves; dynamic inputs have no
    calibrated range."""
    from quantmill.methods.recipe_files import load_recipe

    recipe = load_recipe(ref.partition("@")[0])
    static = recipe.activations is not None and not recipe.activations.dynamic
    if recipe.method in ("gptq", "awq"):
        return static
    return recipe.method != "rtn" or static or bool(recipe.options.get("clip_search", False))


def print_table(meta: dict, results: list[dict]) -> None:
    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    print(f"\n{meta['date']}, {meta['machine']}; eval {meta['eval']} (float ppl {meta['float']['ppl']:.3f}); "
          f"calibration {meta['calibration']}; quantmill stats stage "
          f"{'not run (no row reads it)' if meta['stats_seconds'] is None else format(meta['stats_seconds'], '.1f') + ' s (shared by all rows, not in the times)'}; "
          f"qm s = the method (load and save apart), llmc s = its oneshot call (the same span)")
    header = ["row", "qm s", "llmc s", "time qm/llmc", "qm ppl", "llmc ppl", "qm KL", "llmc KL", "KL qm/llmc", "qm top1", "llmc top1"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        q, p = r.get("quantmill", {}), r.get("peer", {})
        qs, ps = r.get("quantmill_seconds"), r.get("peer_seconds")
        cells = [
            f"{r['row']} ({r['quantmill_recipe']})", num(qs, ".1f"), num(ps, ".1f") if not r.get("peer_error") else "failed",
            num(qs / ps if qs and ps else None, ".2f"), num(q.get("ppl"), ".3f"), num(p.get("ppl"), ".3f"),
            num(q.get("kl"), ".4f"), num(p.get("kl"), ".4f"),
            num(q["kl"] / p["kl"] if q.get("kl") and p.get("kl") else None, ".2f"), num(q.get("top1"), ".3f"), num(p.get("top1"), ".3f"),
        ]
        print("| " + " | ".join(cells) + " |")
    for r in results:
        if r.get("peer_error"):
            print(f"{r['row']}: llm-compressor failed: {r['peer_error']}")


if __name__ == "__main__":
    main()
