"""The per-block driver (quantmill/methods/driver.py) on its own: a method that is only a prepare
step and a weight quantizer gets the walk, the resume, the report and the statistics from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext
from quantmill.methods.driver import BlockMethod, Prepared, run_blocks
from quantmill.methods.recipe_files import load_recipe
from quantmill.methods.rtn import rtn, rtn_quantizer
from quantmill.model.sequential import BlockInputs
from quantmill.model.stats import collect_stats
from quantmill.solvers.smoothquant import fold_smoothing
from tests.tiny import make_tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("driver") / "m", layers=3)


def _ids() -> torch.Tensor:
    return torch.randint(0, 257, (16, 24), generator=torch.Generator().manual_seed(5))


def fold_input_range(index: int, block: nn.Module, inputs: BlockInputs) -> Prepared:
    """A data-dependent exact fold (SmoothQuant's shape, alpha 1/2): q/k/v's input channel j
    divided by sqrt(max|x_j|) in the norm, its columns multiplied back."""
    absmax = torch.stack([h.abs().amax(dim=(0, 1)) for h in inputs.hidden]).amax(0)
    s = absmax.clamp_min(1e-5).sqrt()
    attn = block.self_attn
    fold_smoothing(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s)
    return Prepared(meta={"s_max": float(s.max())}, rows={"self_attn.q_proj": {"s_max": float(s.max())}})


def _run(folder: Path, partial: Path | None = None, on_block_done=None):
    model = load_model(folder)
    recipe = load_recipe("w4a16-rtn-g64")
    ctx = MethodContext(model, recipe, {}, _ids(), CPU, partial, on_block_done)
    method = BlockMethod("folded-rtn", lambda plan: rtn_quantizer(plan, recipe), fold_input_range)
    return model, run_blocks(ctx, method)


def test_a_prepare_step_is_kept_for_a_resume_and_its_rows_reach_the_report(tiny, tmp_path):
    model, whole = _run(tiny)

    class Killed(Exception):
        pass

    def die_after_block_0(i, n, meta):
        if i == 0:
            raise Killed

    with pytest.raises(Killed):
        _run(tiny, tmp_path / "partial", die_after_block_0)
    visited = []
    resumed_model, resumed = _run(tiny, tmp_path / "partial", lambda i, n, meta: visited.append(i))
    assert visited == [1, 2]  # block 0, its fold included, came from the partial folder
    assert [m["s_max"] for m in resumed.metas] == [m["s_max"] for m in whole.metas]
    assert resumed.result.weights.keys() == whole.result.weights.keys()
    for name, qw in whole.result.weights.items():
        assert torch.equal(resumed.result.weights[name].q, qw.q) and torch.equal(resumed.result.weights[name].scale, qw.scale), name
    for i in range(3):  # the folded norms, which no quantized weight holds
        norm = f"model.layers.{i}.input_layernorm.weight"
        assert torch.equal(resumed_model.get_parameter(norm), model.get_parameter(norm)), norm
        assert not torch.equal(model.get_parameter(norm), load_model(tiny).get_parameter(norm)), norm
    rows = {r["module"]: r for r in whole.result.report}
    assert rows["model.layers.1.self_attn.q_proj"]["s_max"] == whole.metas[1]["s_max"]
    assert "s_max" not in rows["model.layers.1.self_attn.k_proj"]
    assert whole.result.notes == {}  # RTN never falls back


def test_without_a_quantizer_the_walk_stays_float_and_rtn_rounds_the_model_after_it(tiny):
    recipe = load_recipe("w8a8-static-minmax")
    stats = collect_stats(load_model(tiny), _ids(), CPU, batch_size=8)
    note = lambda index, block, inputs: Prepared(rows={"mlp.down_proj": {"noted_in_block": index}})  # noqa: E731
    run = run_blocks(MethodContext(load_model(tiny), recipe, stats, _ids(), CPU), BlockMethod("float walk", None, note, record_stats=True))
    plain = rtn(MethodContext(load_model(tiny), recipe, stats, _ids(), CPU))
    assert all("report" not in meta for meta in run.metas)
    noted = {r["module"]: r["noted_in_block"] for r in run.result.report if "noted_in_block" in r}
    assert noted == {f"model.layers.{i}.mlp.down_proj": i for i in range(3)}  # on rtn's rows too
    assert run.stats.keys() == stats.keys()
    for name, s in stats.items():  # nothing prepared: the walk records the stats stage's numbers
        assert torch.equal(run.stats[name].absmax, s.absmax), name
    assert run.result.weights.keys() == plain.weights.keys() == run.result.input_qparams.keys()
    for name, qw in plain.weights.items():
        assert torch.equal(run.result.weights[name].q, qw.q), name
        assert torch.equal(run.result.input_qparams[name][0], plain.input_qparams[name][0]), name
