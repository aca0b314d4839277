"""check_gate: does a quantized result deserve an alias? Limits on the evaluation metrics (from the
recipe's `gate:`, overridden by a flow/CLI parameter) and a generation smoke test.

A failing result is still registered (marked failed, no alias), so the record of what was tried
is never lost; `quantmill promote` refuses it unless forced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from quantmill.core.hashing import canonical_json, sha256_text
from quantmill.eval.evaluate import generation_smoke_test
from quantmill.io.checkpoint import load_quantized
from quantmill.io.sources import load_tokenizer
from quantmill.methods.recipe import QualityGate
from quantmill.tasks.common import log

PASSED, FAILED = "passed", "failed"


def limit_failures(gate: QualityGate | None, metrics: dict[str, Any]) -> list[str]:
    """Each limit the metrics break, as a phrase for people (empty when all hold)."""
    if gate is None:
        return []
    failed = []
    if gate.max_ppl_ratio is not None and not metrics["ppl_ratio"] <= gate.max_ppl_ratio:
        failed.append(f"ppl ratio {metrics['ppl_ratio']:.4f} > {gate.max_ppl_ratio}")
    if gate.max_kl is not None and not (metrics.get("kl") is not None and metrics["kl"] <= gate.max_kl):
        failed.append(f"KL {metrics.get('kl')} > {gate.max_kl}")
    if gate.min_top1_agreement is not None and not (metrics.get("top1_agreement") is not None and metrics["top1_agreement"] >= gate.min_top1_agreement):
        failed.append(f"top-1 agreement {metrics.get('top1_agreement')} < {gate.min_top1_agreement}")
    return failed


def effective_gate(recipe_gate: QualityGate | None, override: QualityGate | None) -> QualityGate | None:
    if override is not None and not override.model_dump(exclude_none=True):
        override = None  # the form's empty gate: no limits (the same cache key as no gate)
    if recipe_gate is None:
        return override
    return recipe_gate.merged(override)


def _cache_key(context: TaskRunContext, p: dict[str, Any]) -> str:
    gate = p.get("gate")
    gate_json = canonical_json(QualityGate.model_validate(gate).model_dump(mode="json") if gate else None)
    return "gate-" + sha256_text(canonical_json([p["quantized"]["key"], p["metrics"], gate_json]))[:32]


@task(name="check_gate", cache_key_fn=_cache_key, persist_result=True)
def check_gate(quantized: dict[str, Any], metrics: dict[str, Any], gate: QualityGate | None = None) -> dict[str, Any]:
    """{"status": passed|failed, "reasons": [...], "limits": {...}, "smoke": {...}}."""
    qdir = Path(quantized["path"]) / "checkpoint"
    model = load_quantized(qdir)
    smoke = generation_smoke_test(model, load_tokenizer(qdir))
    reasons = limit_failures(gate, metrics) + smoke.failures
    status = FAILED if reasons else PASSED
    name = quantized["manifest"]["recipe"]["name"]
    log(f"gate {name}: {status}" + (f" ({'; '.join(reasons)})" if reasons else "") + f"; smoke text {smoke.text[:60]!r}")
    return {
        "status": status,
        "reasons": reasons,
        "limits": gate.model_dump(exclude_none=True) if gate else {},
        "smoke": {"prompt": smoke.prompt, "text": smoke.text, "tokens": smoke.tokens, "finite_logits": smoke.finite_logits},
    }
