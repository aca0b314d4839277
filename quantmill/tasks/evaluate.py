"""evaluate: the fixed protocol on the eval text, for the float model or a quantized one against it.

The float model's entry keeps its record (`reference.safetensors`: its output layer's inputs and
weights, see quantmill/eval/evaluate.py); a quantized model's evaluation reads it and runs only the
quantized model, with KL still exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from quantmill.core.errors import QuantmillError
from quantmill.core.hashing import sha256_text
from quantmill.eval.evaluate import ReferenceRecord, evaluate_against, reference_distributions
from quantmill.io.checkpoint import load_quantized, size_report
from quantmill.io.sources import load_model, load_tokenizer
from quantmill.methods.llm_int8 import llm_int8_outlier_fractions
from quantmill.model.calibration import first_windows, load_text, parse_spec, tokenize_prefix
from quantmill.model.sequential import pick_device
from quantmill.tasks.common import Progress
from quantmill.tasks.resolve import checkpoint_dir
from quantmill.tasks.specs import EvaluationSpec
from quantmill.tasks.stage import Built, Work, run_stage, stage
from quantmill.tasks.store import Entry, StoreError, stage_key

STAGE = "evaluate"
REFERENCE_FILE = "reference.safetensors"


def evaluate_key(model_key: str, quantized_key: str | None, spec: EvaluationSpec) -> str:
    params = {"dataset": parse_spec(spec.dataset).__dict__, "windows": spec.windows, "seq_len": spec.seq_len}
    return stage_key(STAGE, params, {"model": model_key, "quantized": quantized_key or "float"})


def check_finite(metrics: dict[str, Any], what: str) -> None:
    """NaN or inf metrics are a broken evaluation, not a result: refused before the commit, so a
    re-run computes them again instead of reading them from the store (and a gate never passes them)."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise QuantmillError(f"evaluate {what}: {', '.join(f'{k} is {metrics[k]}' for k in bad)} (the model's outputs are not finite); nothing committed")


def _windows(src: Path, spec: EvaluationSpec) -> tuple[Any, str]:
    text = load_text(parse_spec(spec.dataset))
    ids = tokenize_prefix(load_tokenizer(src), text, spec.windows * spec.seq_len)
    return first_windows(ids, spec.windows, spec.seq_len, what=f"evaluation text {spec.dataset}"), sha256_text(text)


def _float_work(model: dict[str, Any], spec: EvaluationSpec, device: str | None) -> Work:
    """The float model's evaluation (perplexity + next-token record), built once per eval text."""
    key = evaluate_key(model["key"], None, spec)

    def build(tmp: Path) -> Built:
        src = checkpoint_dir(model)
        dev = pick_device(device)
        windows, text_sha = _windows(src, spec)
        progress = Progress("evaluate float: windows done")
        result, record = reference_distributions(load_model(src).to(dev), windows, device=dev, on_window=progress.update)
        metrics = result.to_dict()
        metrics["size_bytes"] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        metrics["size_mb"] = metrics["size_bytes"] / 1e6
        check_finite(metrics, "float")
        metrics["eval_text_sha256"] = text_sha
        record.save(tmp / REFERENCE_FILE)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return Built({"metrics": metrics, "what": "float"}, f"evaluated float: ppl {metrics['ppl']:.3f} -> key {key[:12]}")

    return Work(key, build, label="float")


def reference_file(entry: Entry) -> Path:
    """The float evaluation's record; an entry that lost it names itself rather than failing later."""
    path = entry.path / REFERENCE_FILE
    if not path.is_file():
        raise StoreError(f"store entry {STAGE}/{entry.key[:12]} lost its {REFERENCE_FILE}; delete {entry.path} and re-run")
    return path


def _quantized_work(model: dict[str, Any], spec: EvaluationSpec, quantized: dict[str, Any], device: str | None) -> Work:
    key = evaluate_key(model["key"], quantized["key"], spec)
    what = quantized["manifest"]["recipe"]["name"]

    def build(tmp: Path) -> Built:
        reference, _ = run_stage(STAGE, _float_work(model, spec, device))  # normally done already by the flow
        dev = pick_device(device)
        record = ReferenceRecord.load(reference_file(reference))
        progress = Progress(f"evaluate {what}: windows done")
        qdir = Path(quantized["path"]) / "checkpoint"
        candidate = load_quantized(qdir).to(dev)
        metrics = evaluate_against(candidate, record, device=dev, desc=f"eval {what}", on_window=progress.update).to_dict()
        metrics.update(size_report(qdir))
        fractions = llm_int8_outlier_fractions(candidate)
        if fractions:  # LLM.int8(): share of input columns the float path took, per module, on the eval text
            metrics["mean_outlier_fraction"] = sum(fractions.values()) / len(fractions)
            metrics["max_outlier_fraction"] = max(fractions.values())
            metrics["outlier_fraction_by_module"] = fractions
        metrics["quantize_seconds"] = quantized["manifest"]["quantize_seconds"]
        check_finite(metrics, what)
        metrics["eval_text_sha256"] = reference.manifest["metrics"]["eval_text_sha256"]
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        message = f"evaluated {what}: ppl {metrics['ppl']:.3f} (x{metrics['ppl_ratio']:.4f}), KL {metrics['kl']:.4f} -> key {key[:12]}"
        return Built({"metrics": metrics, "what": what}, message)

    return Work(key, build, label=what)


@stage(STAGE)
def evaluate(model: dict[str, Any], spec: EvaluationSpec, quantized: dict[str, Any] | None = None, device: str | None = None) -> Work:
    """Perplexity (and, for a quantized model, KL to the float model, top-1 agreement, paired 95%
    intervals, size) in one forward pass of the model evaluated."""
    spec = EvaluationSpec.model_validate(spec)
    return _float_work(model, spec, device) if quantized is None else _quantized_work(model, spec, quantized, device)
