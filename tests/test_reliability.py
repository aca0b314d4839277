"""Issue 17, end to end through the command line: nothing lost (a killed run's partial results
survive other runs and resume), nothing silently wrong (broken checkpoints and degenerate results
are refused with one line, and nothing is committed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli
from tests.test_cli import assert_one_line_error, leftovers
from tests.tiny import make_tiny_llama

SMALL = ["--calib-samples", "8", "--seq-len", "64", "--eval-windows", "2"]


@pytest.fixture
def cli_env(prefect_api, home: Path) -> dict[str, str]:
    return {"PREFECT_API_URL": prefect_api, "QUANTMILL_HOME": str(home)}


def _gptq_blocks_done(home: Path) -> int:
    for progress in home.glob("quantize/.tmp-*/partial/progress.json"):
        try:
            return json.loads(progress.read_text())["done"] + 1
        except (ValueError, OSError):
            return 0
    return 0


def _checkpoint_tensors(entry: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((entry / "checkpoint").glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _quantize_entry(home: Path, recipe: str) -> Path:
    for manifest in home.glob("quantize/*/manifest.json"):
        if json.loads(manifest.read_text())["recipe"]["name"] == recipe:
            return manifest.parent
    raise AssertionError(f"no quantize entry for {recipe}")


def test_gptq_killed_at_block_k_survives_another_recipe_and_resumes_bit_identically(cli_env, tmp_path):
    """SIGKILL during GPTQ at block k; a run of another recipe (same quantize stage, another key)
    leaves the partial alone; the GPTQ recipe again resumes at block k and ends bit-identical to
    an uninterrupted run."""
    model = make_tiny_llama(tmp_path / "deep", layers=8, hidden=128, intermediate=256)
    base = ["quantize", "--model", str(model), "--calib-samples", "64", "--seq-len", "128", "--eval-windows", "2"]
    gptq = [*base, "--recipe", "w4a16-gptq"]
    home = Path(cli_env["QUANTMILL_HOME"])
    proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", *gptq], cwd=REPO, env={**os.environ, **cli_env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while _gptq_blocks_done(home) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    k = _gptq_blocks_done(home)
    assert 2 <= k < 8
    [partial] = list((home / "quantize").glob(".tmp-*"))

    other = run_cli([*base, "--recipe", "w8a16-rtn"], cli_env)
    assert other.returncode == 0, other.stderr[-2000:]
    assert partial.is_dir() and _gptq_blocks_done(home) == k  # another key's build left it alone

    again = run_cli(gptq, cli_env)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = _quantize_entry(home, "w4a16-gptq")
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["resumed_blocks"] == k  # it started at block k, not block 0
    assert not leftovers(home)

    fresh = tmp_path / "fresh-home"
    whole = run_cli(gptq, {**cli_env, "QUANTMILL_HOME": str(fresh)})
    assert whole.returncode == 0, whole.stderr[-2000:]
    got, want = _checkpoint_tensors(resumed), _checkpoint_tensors(_quantize_entry(fresh, "w4a16-gptq"))
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _entries(home: Path, stage: str) -> list[Path]:
    return sorted(p.parent for p in (home / stage).glob("*/manifest.json"))


def _rewrite(folder: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_missing_a_decoder_layer_is_refused_before_any_work(cli_env, tmp_path):
    model = make_tiny_llama(tmp_path / "holey")
    _rewrite(model, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.1.")]])
    done = run_cli(["quantize", "--model", str(model), *SMALL], cli_env)
    assert_one_line_error(done)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {model}: 9 tensor(s) of the architecture missing from the checkpoint: model.layers.1.input_layernorm.weight, "
        "model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight, model.layers.1.mlp.up_proj.weight and 5 more "
        "(transformers would fill them with random values)"
    )
    home = Path(cli_env["QUANTMILL_HOME"])
    assert not (home / "resolve_model").exists() and not leftovers(home)


def test_a_checkpoint_with_nan_weights_is_refused_by_resolve_and_nothing_is_committed(cli_env, tmp_path):
    model = make_tiny_llama(tmp_path / "nan")
    _rewrite(model, lambda t: t["model.layers.0.self_attn.o_proj.weight"].__setitem__((0, 0), float("nan")))
    done = run_cli(["quantize", "--model", str(model), *SMALL], cli_env)
    assert done.returncode == 2
    assert_one_line_error(done)
    assert done.stderr.strip().splitlines()[-1] == f"error: {model}: tensor model.layers.0.self_attn.o_proj.weight in model.safetensors has 1 non-finite value(s) (NaN or inf)"
    home = Path(cli_env["QUANTMILL_HOME"])
    assert _entries(home, "resolve_model") == [] and not leftovers(home)


def test_a_recipe_that_ignores_every_linear_commits_nothing_and_caches_no_failure(cli_env, tiny_model, tmp_path):
    everything = tmp_path / "nothing-left.yaml"
    everything.write_text("name: nothing-left\nmethod: rtn\nweights: {bits: 8}\nignore: ['re:.*']\n")
    done = run_cli(["quantize", "--model", str(tiny_model), "--recipe", str(everything), *SMALL], cli_env)
    assert done.returncode == 2
    assert_one_line_error(done)
    assert done.stderr.strip().splitlines()[-1] == "error: recipe nothing-left: its ignore patterns ['re:.*'] match every Linear of the decoder blocks: nothing to quantize"
    home = Path(cli_env["QUANTMILL_HOME"])
    assert _entries(home, "quantize") == [] and not leftovers(home)
    ok = run_cli(["quantize", "--model", str(tiny_model), "--recipe", "w8a16-rtn", *SMALL], cli_env)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_nan_metrics_are_refused_and_not_committed(cli_env, tiny_model):
    """A quantized entry whose scales went bad on disk: its evaluation is NaN, refused, not cached."""
    args = ["quantize", "--model", str(tiny_model), "--recipe", "w8a16-rtn", *SMALL]
    assert run_cli(args, cli_env).returncode == 0
    home = Path(cli_env["QUANTMILL_HOME"])
    [quantized] = _entries(home, "quantize")
    _rewrite(quantized / "checkpoint", lambda t: [v.fill_(float("nan")) for k, v in t.items() if k.endswith("weight_scale")])
    [evaluated] = [e for e in _entries(home, "evaluate") if json.loads((e / "manifest.json").read_text())["what"] == "w8a16-rtn"]
    import shutil

    shutil.rmtree(evaluated)
    done = run_cli(args, cli_env)
    assert done.returncode == 2
    assert_one_line_error(done)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: evaluate w8a16-rtn: ppl is nan") and line.endswith("(the model's outputs are not finite); nothing committed"), line
    assert len(_entries(home, "evaluate")) == 1 and not leftovers(home)  # only the float reference


def test_a_corrupt_manifest_names_the_entry(cli_env, tiny_model):
    args = ["quantize", "--model", str(tiny_model), "--recipe", "w8a16-rtn", *SMALL]
    assert run_cli(args, cli_env).returncode == 0
    home = Path(cli_env["QUANTMILL_HOME"])
    [stats] = _entries(home, "collect_stats")
    (stats / "manifest.json").write_text("{truncated")
    done = run_cli(args, cli_env)
    assert done.returncode == 2
    assert_one_line_error(done)
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: store entry collect_stats/{stats.name[:12]} has a corrupt manifest.json "
        f"(Expecting property name enclosed in double quotes: line 1 column 2 (char 1)): delete {stats} and re-run"
    )


@pytest.mark.parametrize("flag, field", [("--seq-len", "seq_len"), ("--calib-samples", "samples")])
def test_zero_sizes_name_the_field(cli_env, tiny_model, flag, field):
    args = ["quantize", "--model", str(tiny_model), *SMALL]
    args[args.index(flag) + 1] = "0"
    done = run_cli(args, cli_env)
    assert done.returncode == 2
    assert_one_line_error(done, f"calibration.{field}", "greater than")


def test_an_alias_bomb_recipe_is_refused_at_once(cli_env, tiny_model, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["name: bomb", "method: rtn", "weights: {bits: 8}", "options:", "  a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    bomb.write_text("\n".join(lines) + "\n")
    start = time.time()
    done = run_cli(["quantize", "--model", str(tiny_model), "--recipe", str(bomb), *SMALL], cli_env)
    assert done.returncode == 2 and time.time() - start < 120
    assert done.stderr.strip().splitlines()[-1] == f"error: recipe {bomb}: line 5: YAML anchor &a (anchors and aliases are not allowed in recipes)"
    assert not (Path(cli_env["QUANTMILL_HOME"]) / "resolve_model").exists()


def test_a_bad_ignore_regex_and_unknown_rtn_option_fail_before_any_work(cli_env, tiny_model, tmp_path):
    bad = tmp_path / "bad-regex.yaml"
    bad.write_text("name: bad-regex\nmethod: rtn\nweights: {bits: 8}\nignore: ['re:(lm_head']\n")
    done = run_cli(["quantize", "--model", str(tiny_model), "--recipe", str(bad), *SMALL], cli_env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: recipe {bad}: ignore pattern 're:(lm_head' is not a valid regular expression (missing ), unterminated subpattern at position 0)"
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: typo\nmethod: rtn\nweights: {bits: 8}\noptions: {blocksize: 64}\n")
    done = run_cli(["quantize", "--model", str(tiny_model), "--recipe", str(typo), *SMALL], cli_env)
    assert done.stderr.strip().splitlines()[-1] == f"error: recipe {typo}: unknown rtn option(s) ['blocksize'] (known: ['clip_grid', 'clip_min_ratio', 'clip_search'])"
    assert not (Path(cli_env["QUANTMILL_HOME"]) / "resolve_model").exists()


def test_two_identical_runs_at_once_both_succeed_with_one_entry_per_stage(cli_env, tiny_model):
    args = [sys.executable, "-m", "quantmill.cli", "quantize", "--model", str(tiny_model), "--recipe", "w8a16-rtn", *SMALL, "--json"]
    procs = [subprocess.Popen(args, cwd=REPO, env={**os.environ, **cli_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1000:] for o in outs]
    rows = [json.loads(o[0])["rows"][0] for o in outs]
    assert rows[0]["quantized_key"] == rows[1]["quantized_key"] and rows[0]["ppl"] == rows[1]["ppl"]
    home = Path(cli_env["QUANTMILL_HOME"])
    for stage, n in (("resolve_model", 1), ("capture_calibration", 1), ("collect_stats", 1), ("quantize", 1), ("evaluate", 2)):
        assert len(_entries(home, stage)) == n, stage
    assert not leftovers(home)


def _read_only_mount_command(folder: Path, command: list[str]) -> list[str]:
    """COMMAND in a private mount namespace where FOLDER is a read-only bind mount: the only way to
    make a folder read-only for root, who ignores permission bits."""
    import shlex

    mount = f"mount --bind {shlex.quote(str(folder))} {shlex.quote(str(folder))} && mount -o remount,bind,ro {shlex.quote(str(folder))}"
    return ["unshare", "--mount", "sh", "-c", f"{mount} && exec {shlex.join(command)}"]


def test_a_read_only_store_is_named_before_any_work(cli_env, tiny_model, tmp_path):
    """Issue 17 scope: output paths writable, checked before the first task."""
    store = Path(cli_env["QUANTMILL_HOME"])
    store.mkdir(parents=True)
    probe = subprocess.run(_read_only_mount_command(store, ["touch", str(store / "x")]), capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"this kernel refuses a private read-only bind mount: {probe.stderr.strip()[:200]}")
    done = subprocess.run(_read_only_mount_command(store, [sys.executable, "-m", "quantmill.cli", "quantize", "--model", str(tiny_model), "--recipe", "w8a16-rtn", *SMALL]),
                          cwd=REPO, env={**os.environ, **cli_env}, capture_output=True, text=True, timeout=600)
    assert_one_line_error(done, f"error: the store (QUANTMILL_HOME) {store} is not writable (Read-only file system)")
    assert done.returncode == 2
    assert list(store.iterdir()) == []


def test_a_plot_path_that_cannot_be_written_is_refused_before_any_work(cli_env, tiny_model, tmp_path):
    base = ["quantize", "--model", str(tiny_model), "--recipe", "w8a16-rtn", *SMALL]
    store = Path(cli_env["QUANTMILL_HOME"])
    assert_one_line_error(run_cli([*base, "--plot", str(tmp_path / "nowhere" / "p.png")], cli_env), f"error: --plot {tmp_path}/nowhere/p.png: folder {tmp_path}/nowhere does not exist")
    assert_one_line_error(run_cli([*base, "--plot", str(tmp_path / "p.txt")], cli_env), "error: --plot", "use a .png, .pdf, .svg file name")
    assert_one_line_error(run_cli([*base, "--plot", str(tmp_path)], cli_env), "use a .png")
    assert not store.exists() or not any(store.iterdir())
