"""The command line: bad input gives one line naming what was wrong, no traceback, non-zero exit,
and nothing half-written in the store; a killed run resumes cleanly."""

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

from quantmill.tasks.store import STAGE_VERSIONS
from tests.conftest import REPO, run_cli
from tests.tiny import make_tiny_gpt2, make_tiny_llama

SMALL = ["--calib-samples", "8", "--seq-len", "64", "--eval-windows", "2"]


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def leftovers(home: Path) -> list[Path]:
    """Folders in the store's stages that are not finished entries (a tmp folder, or no manifest).

    Only stage folders count: the store also holds MLflow's files, downloads and remembered
    file hashes, none of which are stage entries.
    """
    stages = [home / stage for stage in STAGE_VERSIONS if (home / stage).is_dir()]
    return [p for stage in stages for p in stage.iterdir() if not (p / "manifest.json").is_file()]


@pytest.fixture
def cli_env(prefect_api, home: Path) -> dict[str, str]:
    return {"PREFECT_API_URL": prefect_api, "QUANTMILL_HOME": str(home)}


def test_recipes_lists_the_builtins():
    done = run_cli(["recipes"], {})
    assert done.returncode == 0
    assert "w8a16-rtn" in done.stdout and "w4a16-rtn-g64-asym" in done.stdout


def test_missing_model_path(cli_env):
    assert_one_line_error(run_cli(["quantize", "--model", "/no/such/model"], cli_env), "model path not found", "/no/such/model")


def test_unknown_recipe(cli_env, tiny_model):
    assert_one_line_error(run_cli(["quantize", "--model", str(tiny_model), "--recipe", "w5-magic"], cli_env), "unknown recipe", "w5-magic")


def test_unknown_dataset_spec(cli_env, tiny_model):
    assert_one_line_error(run_cli(["quantize", "--model", str(tiny_model), "--calib", "wiki:foo"], cli_env), "unknown dataset spec", "wiki:foo")


def test_pickle_only_checkpoint_is_refused_unless_allowed(cli_env, tmp_path):
    folder = make_tiny_llama(tmp_path / "pickled")
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert_one_line_error(run_cli(["quantize", "--model", str(folder)], cli_env), "only pickle weights", "--allow-pickle")
    assert not leftovers(Path(cli_env["QUANTMILL_HOME"]))


def test_directory_that_is_not_a_causal_lm(cli_env, tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "bert")
    assert_one_line_error(run_cli(["quantize", "--model", str(tmp_path / "bert")], cli_env), "not a causal LM")


def test_text_too_short_for_n_by_l_leaves_nothing_behind(cli_env, tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    done = run_cli(["quantize", "--model", str(tiny_model), "--calib", str(short), *SMALL], cli_env)
    assert_one_line_error(done, "calibration dataset", "too short", "8 x 64 = 512")
    home = Path(cli_env["QUANTMILL_HOME"])
    assert not home.exists() or not any(home.iterdir()), "checked before the first task: nothing computed"


def test_dataset_files_are_checked_before_the_first_task(cli_env, tiny_model, tmp_path):
    """Issue 17 item 4: unreadable, unparseable or short dataset files fail before any stage runs."""
    home = Path(cli_env["QUANTMILL_HOME"])
    missing = tmp_path / "gone.txt"
    assert_one_line_error(run_cli(["quantize", "--model", str(tiny_model), "--calib", str(missing), *SMALL], cli_env),
                          f"dataset file not found: {missing}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert_one_line_error(run_cli(["quantize", "--model", str(tiny_model), "--eval", str(bad), *SMALL], cli_env), f"{bad}:2: not valid JSON")
    short_eval = tmp_path / "eval.txt"
    short_eval.write_text("x" * 100)
    assert_one_line_error(run_cli(["quantize", "--model", str(tiny_model), "--eval", str(short_eval), *SMALL], cli_env),
                          "evaluation dataset", "100 bytes of text cannot give 2 x 64 = 128 tokens")
    assert not home.exists() or not any(home.iterdir())


def test_a_local_models_tokenizer_gives_the_exact_count(tmp_path):
    """Enough bytes but too few tokens: a word-level tokenizer makes one token of each word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from quantmill.flows.params import _check_dataset_file
    from quantmill.core.errors import DatasetError
    from quantmill.io.sources import ModelSource

    words = Tokenizer(models.WordLevel(vocab={"alpha": 0, "beta": 1, "<unk>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text("alpha beta " * 100)  # 1,100 bytes, 200 tokens
    source = ModelSource("dir", str(tmp_path / "model"))
    _check_dataset_file("calibration", str(text), 4, 50, source)  # 200 tokens: enough
    with pytest.raises(DatasetError, match=r"too short: 2\d\d tokens, need 8 x 64 = 512"):
        _check_dataset_file("calibration", str(text), 8, 64, source)


def test_bad_recipe_file_names_the_field(cli_env, tiny_model, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmethod: rtn\nweights: {bits: 12}\n")
    assert_one_line_error(run_cli(["quantize", "--model", str(tiny_model), "--recipe", str(bad)], cli_env), "weights.bits")


def test_debug_shows_the_traceback(cli_env):
    done = run_cli(["quantize", "--model", "/no/such/model", "--debug"], cli_env)
    assert done.returncode != 0 and "Traceback" in done.stderr


def _stats_progress(home: Path) -> int:
    for progress in home.glob("collect_stats/.tmp-*/partial/progress.json"):
        try:
            return json.loads(progress.read_text())["done"]
        except (ValueError, OSError):
            return -1
    return -1


def test_sigkill_during_stats_then_rerun_resumes_and_completes(cli_env, tmp_path):
    """Killed mid-stats: no half-written entry; the re-run adopts the partial blocks and finishes
    with statistics identical to an uninterrupted run."""
    model = make_tiny_llama(tmp_path / "deep", layers=8, hidden=128, intermediate=256)
    args = ["quantize", "--model", str(model), "--recipe", "w8a16-rtn", "--calib-samples", "64", "--seq-len", "128", "--eval-windows", "2"]
    home = Path(cli_env["QUANTMILL_HOME"])
    proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", *args], cwd=REPO, env={**os.environ, **cli_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while _stats_progress(home) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stats_dir = home / "collect_stats"
    assert [p.name for p in stats_dir.iterdir() if not p.name.startswith(".tmp-")] == []  # no entry, only the tmp folder
    done_before = _stats_progress(home)
    assert done_before >= 1

    done = run_cli(args, cli_env)
    assert done.returncode == 0, done.stderr[-2000:]
    entries = [p for p in stats_dir.iterdir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()  # the tmp folder was adopted and committed
    assert not leftovers(home)

    fresh = tmp_path / "fresh-home"
    again = run_cli(args, {**cli_env, "QUANTMILL_HOME": str(fresh)})
    assert again.returncode == 0
    from safetensors.torch import load_file

    resumed = load_file(entries[0] / "stats.safetensors")
    uninterrupted = load_file(next((fresh / "collect_stats").iterdir()) / "stats.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k


def test_a_gpt2_checkpoint_is_refused_before_any_stage(cli_env, tmp_path):
    """GPT-2's blocks are Conv1D, which quantmill does not quantize: refused from config.json
    alone, with one line naming the architecture, before the first stage runs."""
    model = make_tiny_gpt2(tmp_path / "gpt2")
    done = run_cli(["quantize", "--model", str(model), "--recipe", "w8a16-rtn", "--calib-samples", "4", "--seq-len", "32", "--eval-windows", "2"], cli_env)
    assert done.returncode == 2
    assert_one_line_error(done, "architecture 'gpt2' cannot be quantized", "Conv1D")
    home = Path(cli_env["QUANTMILL_HOME"])
    assert not any((home / stage).exists() for stage in STAGE_VERSIONS)  # no stage ran
