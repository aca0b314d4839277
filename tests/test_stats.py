"""Activation statistics of every decoder Linear input, collected block by block and resumably."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

from quantmill.io.sources import load_model
from quantmill.model.sequential import run_sequential
from quantmill.model.stats import VECTOR_FIELDS, block_stats_visitor, collect_stats, load_stats, save_stats
from quantmill.solvers.observers import ActivationStats, OUTLIER_THRESHOLD
from tests.tiny import make_tiny_llama

LAYERS = 3
N, L, BATCH = 8, 32, 4
CPU = torch.device("cpu")
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NAMES = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in PROJS]


class _Killed(Exception):
    """Stands in for a kill after a block's partial results are on disk."""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> nn.Module:
    """A 3-block tiny llama whose norms make a few channels large, so some inputs are outliers."""
    net = load_model(make_tiny_llama(tmp_path_factory.mktemp("stats") / "tiny-llama", seed=1, layers=LAYERS))
    with torch.no_grad():
        for block in net.model.layers:
            block.input_layernorm.weight[5] = 12.0  # q/k/v inputs: channel 5 often >= 6
            block.post_attention_layernorm.weight[9] = -15.0  # gate/up inputs: channel 9 often <= -6
    return net


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 257, (N, L), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def stats(model, ids) -> dict[str, ActivationStats]:
    return collect_stats(model, ids, CPU, batch_size=BATCH)


@pytest.fixture(scope="module")
def direct_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Every decoder Linear's input rows [N*L, C], captured with pre-hooks on full-model forwards."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in NAMES}
    handles = []
    for name, module in model.named_modules():
        if name in seen:
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach().clone())))
    try:
        with torch.no_grad():
            for batch in ids.split(BATCH):
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for name, xs in seen.items()}


def _assert_same_stats(a: ActivationStats, b: ActivationStats) -> None:
    for f in (*VECTOR_FIELDS, "hist", "batch_min", "batch_max"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert getattr(a, f).dtype == getattr(b, f).dtype, f
    assert a.hist_range == b.hist_range and a.count == b.count


def _assert_same_result(a: dict[str, ActivationStats], b: dict[str, ActivationStats]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        _assert_same_stats(a[name], b[name])


# --------------------------------------------------------------------------- what is collected


def test_stats_cover_every_decoder_linear_and_nothing_else(stats, model) -> None:
    assert sorted(stats) == sorted(NAMES)
    assert "lm_head" not in stats
    for name, s in stats.items():
        linear = model.get_submodule(name)
        assert s.absmax.shape == s.min.shape == s.max.shape == s.mean_sq.shape == s.outliers.shape == (linear.in_features,)
        assert s.absmax.dtype == s.mean_sq.dtype == torch.float32 and s.outliers.dtype == torch.int64
        assert s.count == N * L * linear.in_features
        assert s.batch_min.shape == s.batch_max.shape == (N // BATCH,)


def test_linears_reading_the_same_tensor_share_one_record(stats) -> None:
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        assert stats[p + "self_attn.q_proj"] is stats[p + "self_attn.k_proj"] is stats[p + "self_attn.v_proj"]
        assert stats[p + "mlp.gate_proj"] is stats[p + "mlp.up_proj"]
        assert stats[p + "self_attn.o_proj"] is not stats[p + "self_attn.q_proj"]
        assert stats[p + "mlp.down_proj"] is not stats[p + "mlp.gate_proj"]
        assert stats[p + "self_attn.q_proj"].count == N * L * 64  # seen once, not three times


def test_stats_equal_those_of_full_model_forward_hooks(stats, direct_inputs) -> None:
    for name in NAMES:
        x = direct_inputs[name].double()
        s = stats[name]
        assert x.shape[0] == N * L
        torch.testing.assert_close(s.min.double(), x.amin(0), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(s.max.double(), x.amax(0), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(s.absmax.double(), x.abs().amax(0), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(s.mean_sq.double(), x.square().mean(0), rtol=1e-5, atol=1e-9, msg=name)
        assert torch.equal(s.outliers, (x.abs() >= OUTLIER_THRESHOLD).sum(0)), name
        per_batch = x.reshape(N // BATCH, -1)
        torch.testing.assert_close(s.batch_min.double(), per_batch.amin(1), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(s.batch_max.double(), per_batch.amax(1), rtol=1e-5, atol=1e-6, msg=name)


def test_outliers_are_counted_where_the_norm_makes_them(stats) -> None:
    for i in range(LAYERS):
        qkv = stats[f"model.layers.{i}.self_attn.q_proj"].outliers
        gate = stats[f"model.layers.{i}.mlp.gate_proj"].outliers
        assert qkv[5] > 0 and gate[9] > 0  # the test is not vacuous
        assert int(qkv.sum()) == int(qkv[5]) and int(gate.sum()) == int(gate[9])


def test_histogram_sums_to_count_and_covers_absmax(stats) -> None:
    for name, s in stats.items():
        assert s.hist is not None and s.hist.dtype == torch.int64
        assert int(s.hist.sum()) == s.count, name
        assert s.hist_range >= float(s.absmax.max()), name
        assert s.hist_range / 2 < float(s.absmax.max()), name  # the smallest power-of-two range


# --------------------------------------------------------------------------- saving


def test_save_and_load_stats_round_trip(stats, tmp_path) -> None:
    summary = save_stats(stats, tmp_path)
    loaded = load_stats(tmp_path)
    _assert_same_result(loaded, stats)
    assert summary["modules"] == len(NAMES)
    worst = max(stats, key=lambda n: float(stats[n].absmax.max()))
    assert summary["max_absmax"] == pytest.approx(float(stats[worst].absmax.max()))
    assert float(stats[summary["max_absmax_module"]].absmax.max()) == summary["max_absmax"]
    assert json.loads((tmp_path / "modules.json").read_text()) == sorted(NAMES)
    channels = pq.read_table(tmp_path / "channels.parquet")
    assert channels.num_rows == sum(s.absmax.numel() for s in stats.values())
    modules = pq.read_table(tmp_path / "modules.parquet").to_pydict()
    assert sorted(modules["module"]) == sorted(NAMES)
    assert all(t == N * L for t in modules["tokens"])


# --------------------------------------------------------------------------- resume


def test_killed_run_resumes_at_the_next_block_with_identical_stats(model, ids, stats, tmp_path) -> None:
    partial = tmp_path / "partial"

    def kill_after_block_0(index: int, total: int, meta: dict) -> None:
        assert total == LAYERS
        if index == 0:
            raise _Killed

    with pytest.raises(_Killed):
        collect_stats(model, ids, CPU, batch_size=BATCH, partial_dir=partial, on_block_done=kill_after_block_0)
    assert json.loads((partial / "progress.json").read_text()) == {"done": 0}
    assert (partial / "block-0000.safetensors").is_file() and not (partial / "block-0001.safetensors").exists()

    visited: list[int] = []
    resumed = collect_stats(model, ids, CPU, batch_size=BATCH, partial_dir=partial, on_block_done=lambda i, n, m: visited.append(i))
    assert visited == list(range(1, LAYERS))  # block 0 came from disk
    _assert_same_result(resumed, stats)
    p = "model.layers.0."
    assert resumed[p + "self_attn.q_proj"] is resumed[p + "self_attn.v_proj"]
    assert json.loads((partial / "progress.json").read_text()) == {"done": LAYERS - 1}


def test_stop_after_then_resume_gives_the_uninterrupted_stats(model, ids, stats, tmp_path) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = tmp_path / "partial"
    first = run_sequential(model, ids, block_stats_visitor(4096), device=CPU, batch_size=BATCH, partial_dir=partial, stop_after=1)
    assert len(first) == 2
    assert json.loads((partial / "progress.json").read_text()) == {"done": 1}
    resumed = collect_stats(model, ids, CPU, batch_size=BATCH, partial_dir=partial)
    _assert_same_result(resumed, stats)
    after = model.state_dict()  # walking the blocks leaves the model as it was, on the CPU
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_finished_partial_dir_is_read_back_without_visiting(model, ids, stats, tmp_path) -> None:
    partial = tmp_path / "partial"
    collect_stats(model, ids, CPU, batch_size=BATCH, partial_dir=partial)
    visited: list[int] = []
    again = collect_stats(model, ids, CPU, batch_size=BATCH, partial_dir=partial, on_block_done=lambda i, n, m: visited.append(i))
    assert visited == []
    _assert_same_result(again, stats)


def test_batch_size_changes_only_the_per_batch_extremes(model, ids, stats) -> None:
    whole = collect_stats(model, ids, CPU, batch_size=N)
    for name in NAMES:
        a, b = whole[name], stats[name]
        for f in ("absmax", "min", "max", "mean_sq"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-6)
        assert torch.equal(a.outliers, b.outliers) and a.count == b.count
        assert a.batch_max.shape == (1,) and float(a.batch_max[0]) == pytest.approx(float(b.batch_max.max()), rel=1e-5)


def test_the_save_schedule_keeps_saving_near_its_share_of_the_walk() -> None:
    from quantmill.model.sequential import SaveSchedule

    now = [0.0]
    schedule = SaveSchedule(share=0.1, clock=lambda: now[0])
    assert schedule.due()  # the first block is always saved: its cost is not known yet
    now[0] = 2.0
    schedule.saved(started=0.0)  # that save took 2 s
    now[0] = 19.9
    assert not schedule.due()  # 17.9 s of work since: under 9 x 2 s
    now[0] = 20.0
    assert schedule.due()
    schedule.saved(started=19.99)  # a cheap save: due again after 0.09 s of work
    now[0] = 20.1
    assert schedule.due()


def test_blocks_between_saves_are_written_with_the_next_save_and_resume_identically(model, ids, stats, tmp_path) -> None:
    """A schedule due at every other block: block 0 waits and is written with block 1; a crash in
    block 2 leaves both, and the resumed walk gives the uninterrupted stats."""
    from quantmill.model.sequential import SaveSchedule

    class EveryOther(SaveSchedule):
        calls = 0

        def due(self) -> bool:
            self.calls += 1
            return self.calls % 2 == 0

    visit = block_stats_visitor(4096)

    def crash_at_2(index, block, inputs, forward):
        if index == 2:
            raise RuntimeError("killed")
        return visit(index, block, inputs, forward)

    partial = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="killed"):
        run_sequential(model, ids, crash_at_2, device=CPU, batch_size=BATCH, partial_dir=partial, schedule=EveryOther())
    assert json.loads((partial / "progress.json").read_text()) == {"done": 1}
    assert (partial / "block-0000.safetensors").is_file() and (partial / "block-0001.safetensors").is_file()
    visited: list[int] = []
    resumed = collect_stats(model, ids, CPU, batch_size=BATCH, partial_dir=partial, on_block_done=lambda i, n, m: visited.append(i))
    assert visited == list(range(2, LAYERS))
    _assert_same_result(resumed, stats)
