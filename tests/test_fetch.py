"""What a serving team does with a registered version, against real MLflow backends: pull it (every
file checked against the sha256 recorded at registration), load it with transformers, score it,
serve it with `mlflow models serve`, promote it through the quality gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from quantmill.flows.quantize import quantize_flow
from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec
from tests.conftest import _free_port, run_cli

EVAL = EvaluationSpec(windows=2, seq_len=64)
SMALL = dict(calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EVAL)
VENV_BIN = str(Path(sys.executable).parent)

# A separate process, as a serving engineer's would be: load the pulled folder with transformers
# only, score the flow's eval windows, and generate.
SCORE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
from quantmill.eval.evaluate import evaluate_windows
folder, windows, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
ids = first_windows(tokenize_prefix(tok, load_text(parse_spec("stdlib:eval")), windows * seq_len), windows, seq_len)
ppl = evaluate_windows(model, ids).ppl
prompt = tok("def main():", return_tensors="pt").input_ids
out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
print(json.dumps({"ppl": ppl, "new_tokens": int(out.shape[1] - prompt.shape[1]), "text": tok.decode(out[0, prompt.shape[1]:])}))
"""


def _cli_env(tracking: str | None = None) -> dict[str, str]:
    env = {"QUANTMILL_HOME": os.environ["QUANTMILL_HOME"], "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    return env


def _one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Downloading artifacts" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_pull_from_a_real_server_loads_scores_as_registered_and_generates(prefect_api, tiny_model, home, tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = quantize_flow(model=str(tiny_model), recipes=["w4a16-rtn-g64"], register_as="served", **SMALL)
    row = out["rows"][0]
    assert row["uri"] == "models:/served-w4a16-rtn-g64/1" and row["gate"] == "passed"

    dst = tmp_path / "pulled"
    pulled = run_cli(["pull", "models:/served-w4a16-rtn-g64@candidate", str(dst)], _cli_env(mlflow_server))
    assert pulled.returncode == 0, pulled.stderr
    assert "every sha256 verified" in pulled.stdout and f'from_pretrained("{dst}")' in pulled.stdout
    assert (dst / "MLmodel").is_file() and (dst / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pulled")]  # no scratch left

    scored = subprocess.run([sys.executable, "-c", SCORE, str(dst), str(EVAL.windows), str(EVAL.seq_len)], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    registered = _client().get_run(_client().get_model_version_by_alias("served-w4a16-rtn-g64", "candidate").run_id).data.metrics["ppl"]
    assert result["ppl"] == pytest.approx(registered, rel=1e-3)
    assert result["new_tokens"] == 12 and result["text"].strip()

    shown = run_cli(["show", "models:/served-w4a16-rtn-g64/1", "--json"], _cli_env(mlflow_server))
    info = json.loads(shown.stdout)
    assert info["lineage"]["stage_keys"]["quantize"] == row["quantized_key"]
    assert info["lineage"]["prefect_flow_run_id"] == out["flow_run_id"]
    assert info["evaluation"]["windows"] == "2" and info["evaluation"]["seq_len"] == "64"
    assert set(info["checkpoint_sha256"]) >= {"model.safetensors", "config.json", "MLmodel", "quantmill.json"}
    listed = json.loads(run_cli(["models", "served", "--json"], _cli_env(mlflow_server)).stdout)
    assert [(r["uri"], r["aliases"], r["gate"]) for r in listed] == [("models:/served-w4a16-rtn-g64/1", ["candidate"], "passed")]


def _client():
    from quantmill.tasks.registry import client

    return client()


@pytest.fixture
def registered(prefect_api, tiny_model, home) -> dict:
    """One passing version in the SQLite registry of a private QUANTMILL_HOME."""
    return quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], register_as="tiny", **SMALL)["rows"][0]


def test_pyfunc_loads_a_models_uri_and_quantmill_load_caches_by_version(registered, home):
    import mlflow
    import pandas as pd

    from quantmill import load
    from quantmill.tasks.registry import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    served = mlflow.pyfunc.load_model("models:/tiny-w8a16-rtn@candidate")
    texts = served.predict(pd.DataFrame({"prompt": ["hello", "def f(x):"]}), params={"max_new_tokens": 6})
    assert list(texts.columns) == ["text"] and len(texts) == 2 and all(isinstance(t, str) for t in texts["text"])
    assert served.metadata.signature.params.to_dict()[0]["name"] == "max_new_tokens"

    model, tokenizer = load("models:/tiny-w8a16-rtn@candidate")
    folder = home / "models" / "tiny-w8a16-rtn" / "1"
    weights = folder / "model.safetensors"
    first = weights.stat().st_ino
    again, _ = load("models:/tiny-w8a16-rtn/1")  # cached: not downloaded a second time
    assert weights.stat().st_ino == first
    ids = tokenizer("abc", return_tensors="pt").input_ids
    assert (model(ids).logits == again(ids).logits).all()


def test_mlflow_models_serve_answers_invocations_with_generated_text(registered, home):
    from quantmill.tasks.registry import tracking_uri

    port = _free_port()
    env = {**os.environ, **_cli_env(tracking_uri())}
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "mlflow"), "models", "serve", "-m", "models:/tiny-w8a16-rtn@candidate", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "mlflow models serve did not start"
            time.sleep(0.5)
        body = json.dumps({"dataframe_records": [{"prompt": "hello"}, {"prompt": "import os"}], "params": {"max_new_tokens": 5}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        assert len(predictions) == 2 and all(isinstance(p["text"], str) and p["text"] for p in predictions)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


# The tiny random model's next-token distribution is nearly flat, so its perplexity hardly moves
# even at 2 bits; its top-1 choices do (0.99 agree at W8, far fewer at W2).
W2_GATED = """name: w2-gated
method: rtn
weights: {bits: 2, granularity: group, group_size: 32}
gate: {max_ppl_ratio: 1.05, min_top1_agreement: 0.9}
"""


def test_gate_failure_is_registered_without_alias_and_promote_refuses_it(prefect_api, tiny_model, home):
    out = quantize_flow(model=str(tiny_model), recipes=[], recipe_yaml=W2_GATED, register_as="gated", **SMALL)
    row = out["rows"][0]
    assert row["gate"] == "failed" and "top-1 agreement" in row["gate_reasons"], row
    version = _client().get_model_version("gated-w2-gated", "1")
    assert version.tags["quantmill.gate"] == "failed" and "< 0.9" in version.tags["quantmill.gate.reasons"]
    assert dict(_client().get_registered_model("gated-w2-gated").aliases or {}) == {}
    assert "failed" in version.description

    refused = run_cli(["promote", "models:/gated-w2-gated/1", "--alias", "production"], _cli_env())
    _one_error_line(refused, "models:/gated-w2-gated/1 failed its quality gate", "--force")
    assert dict(_client().get_registered_model("gated-w2-gated").aliases or {}) == {}
    forced = run_cli(["promote", "models:/gated-w2-gated/1", "--alias", "production", "--force", "--json"], _cli_env())
    assert forced.returncode == 0 and json.loads(forced.stdout)["forced"] is True


def test_promote_moves_production_between_passing_versions_and_records_it(prefect_api, tiny_model, home):
    first = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], register_as="promo", **SMALL)["rows"][0]
    second = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], register_as="promo", calibration=CalibrationSpec(samples=8, seq_len=64, seed=1), evaluation=EVAL)["rows"][0]
    assert (first["uri"], second["uri"]) == ("models:/promo-w8a16-rtn/1", "models:/promo-w8a16-rtn/2")
    assert run_cli(["promote", "models:/promo-w8a16-rtn/1", "--alias", "production"], _cli_env()).returncode == 0
    moved = run_cli(["promote", "models:/promo-w8a16-rtn@candidate", "--alias", "production", "--json"], _cli_env())
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["from_version"] == "1"
    assert str(_client().get_model_version_by_alias("promo-w8a16-rtn", "production").version) == "2"
    record = json.loads(_client().get_model_version("promo-w8a16-rtn", "2").tags["quantmill.promoted.production"])
    assert record["from_version"] == "1" and record["forced"] is False


def _artifact_file(version_uri: str, name: str) -> Path:
    """The stored copy of one file of a version in the SQLite backend's artifact folder."""
    from quantmill.tasks.registry import MODEL_ARTIFACT

    c = _client()
    model_name, number = version_uri[len("models:/") :].rsplit("/", 1)
    run = c.get_run(c.get_model_version(model_name, number).run_id)
    return Path(run.info.artifact_uri.removeprefix("file://")) / MODEL_ARTIFACT / name


def test_pull_refuses_a_changed_artifact_and_leaves_nothing(registered, home, tmp_path):
    stored = _artifact_file(registered["uri"], "model.safetensors")
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "pulled"
    proc = run_cli(["pull", "models:/tiny-w8a16-rtn@candidate", str(dst)], _cli_env())
    _one_error_line(proc, "models:/tiny-w8a16-rtn/1: file model.safetensors does not match the sha256 recorded at registration")
    assert list(out.iterdir()) == []  # neither DIR nor a scratch folder beside it


def test_registry_commands_bad_input_is_one_line_exit_2(registered, home, tmp_path):
    env = _cli_env()
    _one_error_line(run_cli(["pull", "models:/nope@candidate", str(tmp_path / "a")], env), "no registered model 'nope'")
    _one_error_line(run_cli(["show", "models:/tiny-w8a16-rtn@nope"], env), "registered model 'tiny-w8a16-rtn' has no alias 'nope'")
    _one_error_line(run_cli(["pull", "hf:org/name", str(tmp_path / "a")], env), "'hf:org/name' is not a registry URI")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _one_error_line(run_cli(["pull", "models:/tiny-w8a16-rtn@candidate", str(full)], env), f"{full} is not empty", "--force")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    _one_error_line(run_cli(["promote", "models:/tiny-w8a16-rtn/1", "--alias", "latest"], env), "alias 'latest' is not allowed")
    start = time.monotonic()
    _one_error_line(run_cli(["models"], _cli_env(f"http://127.0.0.1:{_free_port()}")), "MLflow tracking server http://127.0.0.1:", "unreachable")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "a").exists()


def test_unreachable_server_keeps_the_work_and_register_replays_it(prefect_api, tiny_model, home, mlflow_server, monkeypatch):
    from quantmill.core.errors import QuantmillError
    from quantmill.tasks.store import Store

    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    start = time.monotonic()
    with pytest.raises(QuantmillError, match=f"MLflow tracking server {dead} is unreachable.*quantmill register"):
        quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], register_as="later", **SMALL)
    assert time.monotonic() - start < 120  # the 15 s reach limit, not MLflow's minutes of retries
    pending = list((home / "pending-registrations").glob("*.json"))
    assert len(pending) == 1
    quantized = Store(home).root / "quantize"
    entries = sorted(p.name for p in quantized.iterdir() if len(p.name) == 64)

    done = run_cli(["register", "--json"], _cli_env(mlflow_server))
    assert done.returncode == 0, done.stderr
    assert [r["uri"] for r in json.loads(done.stdout)] == ["models:/later-w8a16-rtn/1"]
    assert sorted(p.name for p in quantized.iterdir() if len(p.name) == 64) == entries  # nothing recomputed
    assert not list((home / "pending-registrations").glob("*.json"))
    assert run_cli(["register"], _cli_env(mlflow_server)).stdout.strip() == "nothing pending"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    version = _client().get_model_version_by_alias("later-w8a16-rtn", "candidate")
    assert version.tags["quantmill.quantized_key"] == entries[0]


def test_models_lists_around_another_tools_model_whose_name_has_a_quote(registered, home):
    """MLflow filter strings cannot escape a quote: a foreign registered model named `tiny'x` must
    not break `quantmill models` (issue 17 item 4: names are never pasted into filters unchecked)."""
    _client().create_registered_model("tiny'x")
    done = run_cli(["models", "tiny", "--json"], _cli_env())
    assert done.returncode == 0, done.stderr
    assert [r["uri"] for r in json.loads(done.stdout)] == ["models:/tiny-w8a16-rtn/1"]
