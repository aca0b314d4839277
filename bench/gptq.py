"""RTN vs GPTQ on the embedded SmolLM2-135M (`demo`): quality, quantize time, time per block, and
the peak host memory of the quantize stage.

    QUANTMILL_HOME=/tmp/qmdemo PREFECT_HOME=/tmp/phdemo nice -n 10 .venv/bin/python bench/gptq.py

How it measures:
1. Each recipe's quantize stage runs in a fresh Python process (a one-task Prefect flow around
   `quantmill.tasks.quantize.quantize`), writing into a scratch store whose shared stages (resolve,
   calibration, stats) are links to $QUANTMILL_HOME's. That process resets its peak-RSS mark
   (Linux /proc/self/clear_refs) just before the stage and reads VmHWM after it, so the number is
   the quantize stage's own peak, not that of earlier stages or of the evaluation. The finished
   entry moves into $QUANTMILL_HOME when that has none yet (else it is compared and dropped).
   The measurement is recorded in $QUANTMILL_HOME/bench/gptq/<quantize key>.json; a later run
   reuses it while the entry exists (`--remeasure` measures again). A GPTQ stage takes tens of
   minutes on 2 shared cores, so this saves hours.
2. The quantize flow (`quantmill.flows.quantize.quantize_flow`, in this process, default calibration
   64 x 512 and evaluation 32 x 512) then evaluates every recipe; resolve, calibration, stats,
   the float evaluation and every quantize entry are served from the store.

Quantize time is the stage's own (`quantize_seconds`: model load + method, as recorded in the
store manifest); s/block is the mean wall time of one decoder block in the sequential engine.
`--model`, `--calib-samples`, `--seq-len`, `--eval-windows` exist to smoke-test on a tiny model.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
warnings.filterwarnings("ignore")

W3_RTN = str(REPO / "bench" / "recipes" / "w3a16-rtn-g64.yaml")  # not a built-in: the bench's baseline
# (scheme, RTN recipe, GPTQ recipe)
PAIRS = [
    ("w4a16 per-channel", "w4a16-rtn", "w4a16-gptq"),
    ("w4a16 g64", "w4a16-rtn-g64", "w4a16-gptq-g64"),
    ("w4a16 g64 act-order", "w4a16-rtn-g64", "w4a16-gptq-g64-actorder"),
    ("w3a16 g64", W3_RTN, "w3a16-gptq-g64"),
    ("w8a16 per-channel", "w8a16-rtn", "w8a16-gptq"),
]
SHARED_STAGES = ("resolve_model", "capture_calibration", "collect_stats", "downloads")


# ---------------------------------------------------------------- memory (Linux /proc, psutil fallback)

def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss / 1e6
    return kb * 1024 / 1e6


def reset_peak() -> bool:
    """Set the peak-RSS mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    return kb * 1024 / 1e6


# ---------------------------------------------------------------- child: one quantize stage, measured

def _specs(args):
    from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec

    return CalibrationSpec(samples=args.calib_samples, seq_len=args.seq_len), EvaluationSpec(windows=args.eval_windows, seq_len=args.seq_len)


def measure_child(args) -> None:
    """Runs in a fresh process with QUANTMILL_HOME = the scratch store; writes one JSON line."""
    from prefect import flow

    from quantmill.methods.recipe_files import load_recipe
    from quantmill.tasks.calibrate import capture_calibration
    from quantmill.tasks.quantize import quantize
    from quantmill.tasks.resolve import resolve_model
    from quantmill.tasks.stats import collect_stats

    calibration, _ = _specs(args)

    @flow(name="bench-gptq-quantize-stage")
    def stage(model: str, recipe_ref: str) -> dict:
        resolved = resolve_model(model, False)
        calib = capture_calibration(resolved, calibration)
        stats = collect_stats(resolved, calib, None)
        recipe = load_recipe(recipe_ref)
        gc.collect()
        before = rss_mb()
        exact = reset_peak()
        start = time.perf_counter()
        q = quantize(resolved, calib, stats, recipe, None)
        wall = time.perf_counter() - start
        peak = peak_mb()
        m = q["manifest"]
        return {
            "recipe": recipe.name, "key": q["key"], "path": q["path"], "reused": q["reused"],
            "rss_before_mb": before, "peak_mb": peak, "peak_exact": exact, "wall_s": wall,
            "quantize_seconds": m["quantize_seconds"] + m.get("resumed_block_seconds", 0.0),
            "resumed_blocks": m.get("resumed_blocks", 0), "mean_block_seconds": m.get("mean_block_seconds"),
            "blocks_timed": len(m.get("block_seconds", {})),
        }

    out = stage(args.model, args.measure)
    Path(args.result).write_text(json.dumps(out))


# ---------------------------------------------------------------- parent

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server() -> subprocess.Popen | None:
    """One Prefect server for this bench and its children (unless PREFECT_API_URL is set)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    port = _free_port()
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("prefect server did not start")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = url
    return proc


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def record_path(home: Path, key: str) -> Path:
    """Where a measurement of the quantize entry `key` is kept (beside the store, not in it)."""
    return home / "bench" / "gptq" / f"{key}.json"


def measure(recipe_ref: str, key: str, args, home: Path, attempts: int = 3) -> dict:
    """Run the quantize stage of one recipe in a fresh process against a scratch store; the
    measurement is recorded under $QUANTMILL_HOME/bench/gptq/<quantize key>.json.

    The scratch store is kept when the process dies (a machine shared with other jobs may kill
    it), so the next attempt resumes the stage at the next block, as the store is built to; the
    record then says how many blocks were resumed and the stage's time includes theirs.
    """
    scratch = home / ".bench-scratch" / key
    scratch.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        if (home / stage).exists() and not (scratch / stage).exists():
            (scratch / stage).symlink_to(home / stage)
    result = scratch / "result.json"
    cmd = [sys.executable, __file__, "--measure", recipe_ref, "--result", str(result), "--model", args.model,
           "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows)]
    for attempt in range(1, attempts + 1):
        result.unlink(missing_ok=True)
        proc = subprocess.run(cmd, env={**os.environ, "QUANTMILL_HOME": str(scratch)}, capture_output=True, text=True)
        if proc.returncode == 0:
            break
        tail = (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()
        if attempt == attempts or "termination signal" not in tail and proc.returncode >= 0:
            raise RuntimeError(f"measuring {recipe_ref} failed (exit {proc.returncode}); the scratch store {scratch} is kept for a resume:\n{tail}")
        print(f"  {recipe_ref}: the measuring process was killed (exit {proc.returncode}); resuming", flush=True)
    out = json.loads(result.read_text())
    out["attempts"] = attempt
    fresh = Path(out["path"])
    final = home / "quantize" / out["key"]
    if (final / "manifest.json").is_file():
        out["same_as_stored"] = _tree_digest(fresh / "checkpoint") == _tree_digest(final / "checkpoint")
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)  # a folder without a manifest is not an entry
        os.replace(fresh, final)
        out["same_as_stored"] = None
    out["path"] = str(final)
    out["measured"] = time.strftime("%Y-%m-%d %H:%M")
    out["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = record_path(home, out["key"])
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(out, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _name(ref: str) -> str:
    return Path(ref).stem if ref.endswith(".yaml") else ref


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(summary: dict, measured: dict[str, dict], fp_mb: float) -> str:
    rows_by = {r["recipe"]: r for r in summary["rows"]}
    head = ["scheme", "method", "ppl", "ppl ratio", "KL", "top-1", "quant s", "s/block", "peak RSS MB", "stage +MB"]
    lines = [head]
    fp = summary["reference"]
    lines.append(["float32 reference", "-", f"{fp['ppl']:.3f}", "1.000", "-", "-", "-", "-", "-", "-"])
    for scheme, rtn, gptq in PAIRS:
        if not all(_name(r) in rows_by and _name(r) in measured for r in (rtn, gptq)):
            continue  # a subset (--only) shows whole pairs only
        for method, ref in (("RTN", rtn), ("GPTQ", gptq)):
            name = _name(ref)
            r, m = rows_by[name], measured[name]
            lines.append([
                scheme, method, f"{r['ppl']:.3f}", f"{r['ppl_ratio']:.3f}", f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}",
                f"{m['quantize_seconds']:.1f}" + ("*" if m.get("resumed_blocks") else ""), _f(m["mean_block_seconds"], ".2f"), f"{m['peak_mb']:.0f}",
                f"{m['peak_mb'] - m['rss_before_mb']:.0f}",
            ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for k, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def checks(summary: dict, measured: dict[str, dict], fp_mb: float) -> str:
    rows = {r["recipe"]: r for r in summary["rows"]}
    fp = summary["reference"]["ppl"]
    ok = lambda c: "PASS" if c else "FAIL"  # noqa: E731
    lines = []
    if {"w4a16-gptq", "w4a16-rtn"} <= set(rows):
        ratio = (rows["w4a16-gptq"]["ppl"] - fp) / (rows["w4a16-rtn"]["ppl"] - fp)
        lines.append(f"(ppl_gptq - ppl_fp) / (ppl_rtn - ppl_fp), w4a16 per-channel: {ratio:.3f} (must be <= 0.75): {ok(ratio <= 0.75)}")
    if {"w4a16-gptq-g64", "w4a16-rtn-g64"} <= set(rows):
        g64 = rows["w4a16-gptq-g64"]["ppl"], rows["w4a16-rtn-g64"]["ppl"]
        lines.append(f"w4a16 g64: GPTQ ppl {g64[0]:.3f} vs RTN {g64[1]:.3f} (must be below): {ok(g64[0] < g64[1])}")
    gptq = [_name(n) for _, _, n in PAIRS if _name(n) in measured]
    budget = 2 * fp_mb
    lines.append(f"fp32 checkpoint {fp_mb:.0f} MB -> budget 2 x = {budget:.0f} MB")
    if gptq:
        worst = max(gptq, key=lambda n: measured[n]["peak_mb"])
        worst_delta = max(gptq, key=lambda n: measured[n]["peak_mb"] - measured[n]["rss_before_mb"])
        lines += [
            f"peak RSS of a GPTQ quantize stage (whole process, incl. ~{measured[worst]['rss_before_mb']:.0f} MB of imported libraries): "
            f"{measured[worst]['peak_mb']:.0f} MB ({worst}): {ok(measured[worst]['peak_mb'] <= budget)}",
            f"peak RSS added by a GPTQ quantize stage (above the process before it): "
            f"{measured[worst_delta]['peak_mb'] - measured[worst_delta]['rss_before_mb']:.0f} MB ({worst_delta}): "
            f"{ok(measured[worst_delta]['peak_mb'] - measured[worst_delta]['rss_before_mb'] <= budget)}",
        ]
    if not all(m["peak_exact"] for m in measured.values()):
        lines.append("note: /proc/self/clear_refs unavailable: peaks include the process's start-up")
    lines.append("quantize stages measured (1-min load average of the machine): " + ", ".join(
        f"{n} {m.get('measured', '?')} ({m['load_average'][0]:.1f})" if m.get("load_average") else f"{n} {m.get('measured', '?')}"
        for n, m in measured.items()))
    resumed = [f"{n} ({m['resumed_blocks']} blocks)" for n, m in measured.items() if m.get("resumed_blocks")]
    if resumed:
        lines.append("* killed by another job and resumed by the store (time = both runs' blocks + the last run; peak = the last run's): " + ", ".join(resumed))
    same = [n for n, m in measured.items() if m.get("same_as_stored") is not None]
    if same:
        lines.append("re-quantized entries identical to the stored ones: "
                     + ", ".join(f"{n} {'yes' if measured[n]['same_as_stored'] else 'NO'}" for n in same))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--only", nargs="+", help="only these recipes (names of the table's, or extra YAML files)")
    p.add_argument("--remeasure", action="store_true", help="measure every quantize stage again, even when recorded")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: one quantize stage
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure_child(args)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below (our Prefect server)
    server = start_prefect_server()  # before prefect is imported: its settings read PREFECT_API_URL once
    from quantmill.methods.recipe_files import load_recipe
    from quantmill.tasks.quantize import quantize_key
    from quantmill.tasks.store import default_root

    home = default_root()
    home.mkdir(parents=True, exist_ok=True)
    try:
        from quantmill.flows.quantize import quantize_flow

        calibration, evaluation = _specs(args)
        # The shared stages (resolve, calibration, stats, float evaluation) first, so that every
        # measured process finds them in the store.
        shared = quantize_flow(model=args.model, recipes=[], calibration=calibration, evaluation=evaluation)
        keys = {s["stage"]: s["key"] for s in shared["stages"]}
        recipes = list(dict.fromkeys(r for _, rtn, gptq in PAIRS for r in (rtn, gptq)))
        if args.only:  # a subset (experiments); the table shows what it has
            recipes = [r for r in recipes if _name(r) in args.only] + [r for r in args.only if r.endswith(".yaml")]
        measured: dict[str, dict] = {}
        for ref in recipes:
            recipe = load_recipe(ref)
            key = quantize_key(keys["resolve_model"], keys["capture_calibration"], keys["collect_stats"], recipe)
            record = record_path(home, key)
            if not args.remeasure and record.is_file() and (home / "quantize" / key / "manifest.json").is_file():
                m = json.loads(record.read_text())
                how = f"recorded {m['measured']}"
            else:
                t = time.perf_counter()
                m = measure(ref, key, args, home)
                how = f"measured now, {time.perf_counter() - t:.0f} s with start-up"
            measured[m["recipe"]] = m
            print(f"  {m['recipe']:<24} quantize {m['quantize_seconds']:7.1f} s  peak {m['peak_mb']:6.0f} MB "
                  f"(+{m['peak_mb'] - m['rss_before_mb']:.0f})  [{how}]", flush=True)

        summary = quantize_flow(model=args.model, recipes=recipes, calibration=calibration, evaluation=evaluation)
        fp_mb = summary["reference"]["size_mb"]
        print()
        import torch

        from quantmill.model.sequential import pick_device

        device = pick_device()
        accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
        print(f"bench/gptq.py on {args.model}: calibration {args.calib_samples} x {args.seq_len} stdlib:calib, "
              f"evaluation {args.eval_windows} x {args.seq_len} stdlib:eval; {platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), {accelerator}; {time.strftime('%Y-%m-%d')}")
        print()
        print(table(summary, measured, fp_mb))
        print()
        print(checks(summary, measured, fp_mb))
    finally:
        if server is not None:
            try:
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)  # the run logs still queued, before their server goes
            except Exception:
                pass
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
