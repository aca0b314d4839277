"""bench/gpu.py runs on the CPU with the tiny shape, and its table keeps its promises: one row per
method after the stats row, the block slice and its extrapolation, the issue's memory budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A slow test: four methods over two blocks of the tiny shape, ~1 min on 2 idle cores (AWQ's
# searches take most of it), 4.4 min measured while another bench held the cores.
pytestmark = pytest.mark.slow


def test_gpu_bench_tiny_shape_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--shape", "tiny", "--device", "cpu", "--blocks", "2", "--calib-samples", "8", "--seq-len", "32", "--workdir", str(tmp_path), "--json", str(out)]
    proc = subprocess.run([sys.executable, "bench/gpu.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]

    assert [r["row"] for r in rows] == ["stats", "rtn", "gptq", "awq", "smoothquant"]
    assert (result["blocks"], result["full_blocks"]) == (2, 4)
    for r in rows:
        assert r["blocks"] == 2 and r["total_s"] > 0 and r["s_per_block"] > 0, r
        assert r["total_full_s"] > r["total_s"], r  # 2 of 4 blocks: the extrapolation adds time
        assert r["device_peak_gb"] is None and r["host_peak_gb"] > 0
    for r in rows[1:]:
        assert r["modules"] == 2 * 7, r  # q, k, v, o, gate, up, down in each of the 2 blocks
    for r in rows:
        if r["row"] != "rtn":  # rtn quantizes Linear by Linear without walking the blocks
            assert len(r["block_s"]) == 2 and all(s > 0 for s in r["block_s"]), r
    assert [r["recipe"] for r in rows[1:]] == ["w4a16-rtn-g128", "w4a16-gptq-g128", "w4a16-awq-g128", "w8a8-smoothquant-auto"]

    # The budget is one block's float32 weights + N x L x hidden float32 activations + 2 GB.
    c = result["config"]
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    block_params = 2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"] + 2 * h
    assert result["device_budget_gb"] == pytest.approx((4 * block_params + 4 * 8 * 32 * h + 2e9) / 1e9)

    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("row "))
    assert "total@4 s (extrap.)" in table[header] and "budget GB" in table[header]
    assert [line.split()[0] for line in table[header + 2 : header + 7]] == [r["row"] for r in rows]
    assert "random token ids" in proc.stdout and "2 of 4 decoder blocks" in proc.stdout
