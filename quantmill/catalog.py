"""The registry as a serving team reads it: list versions, show one, promote one.

Everything comes from MLflow (tags written by quantmill/tasks/registry.py, metrics of the version's run), so
what `quantmill models` prints is what any MLflow client sees.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from quantmill.tasks.registry import CHECKPOINT_TAG, GATE_TAG, SOURCE_TAG, checkpoint_hashes
from quantmill.tasks.tracking import RegistryError, check_model_name, client, get_version, tracking_uri

ALIAS_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
PROMOTION_TAG = "quantmill.promoted."
LIST_METRICS = ("ppl", "ppl_ratio", "kl", "top1_agreement", "size_mb", "bits_per_weight")


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else "-"


def _metrics(c, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        return dict(c.get_run(run_id).data.metrics)
    except Exception:  # a run deleted by hand: the version still lists
        return {}


def _row(c, version, aliases: dict[str, str]) -> dict[str, Any]:
    metrics = _metrics(c, version.run_id)
    return {
        "uri": f"models:/{version.name}/{version.version}",
        "aliases": sorted(a for a, v in aliases.items() if str(v) == str(version.version)),
        "recipe": version.tags.get("quantmill.recipe"),
        "source": version.tags.get("quantmill.source"),
        **{k: metrics.get(k) for k in LIST_METRICS},
        "gate": version.tags.get(GATE_TAG, "none"),
        "created": _when(version.creation_timestamp),
    }


def list_versions(pattern: str = "") -> list[dict[str, Any]]:
    """One row per version of every registered model quantmill made whose name contains `pattern`
    (`*` matches anything)."""
    if not re.match(r"^[A-Za-z0-9._*-]*$", pattern):
        raise RegistryError(f"model pattern {pattern!r} may hold letters, digits, '.', '_', '-' and '*'")
    c = client()
    like = "%" + pattern.replace("*", "%") + "%"
    rows = []
    for model in c.search_registered_models(filter_string=f"name LIKE '{like}'", max_results=1000):
        try:
            check_model_name(model.name)  # quantmill's names only: another tool's "a'b" would break the filter below
        except RegistryError:
            continue
        for version in sorted(c.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
            if "quantmill.quantized_key" in version.tags:
                rows.append(_row(c, version, dict(model.aliases or {})))
    return rows


def describe(uri: str) -> dict[str, Any]:
    """Everything recorded of one version: lineage, metrics, gate, checkpoint hashes, promotions."""
    c = client()
    version = get_version(uri)
    tags = version.tags
    if "quantmill.quantized_key" not in tags:
        raise RegistryError(f"models:/{version.name}/{version.version} was not registered by quantmill")
    run = c.get_run(version.run_id) if version.run_id else None
    stage_keys = {k[len("quantmill.key.") :]: v for k, v in tags.items() if k.startswith("quantmill.key.")}
    return {
        "uri": f"models:/{version.name}/{version.version}",
        "tracking_uri": tracking_uri(),
        "aliases": sorted(version.aliases or []),
        "created": _when(version.creation_timestamp),
        "run_id": version.run_id,
        "lineage": {
            "source": tags.get("quantmill.source"),
            "source_revision": tags.get("quantmill.source.revision"),
            "source_file_sha256": {k[len(SOURCE_TAG) :]: v for k, v in tags.items() if k.startswith(SOURCE_TAG)},
            "calibration_text_sha256": tags.get("quantmill.calibration.text_sha256"),
            "calibration": run.data.params.get("calibration") if run else None,
            "recipe": tags.get("quantmill.recipe"),
            "recipe_hash": tags.get("quantmill.recipe_hash"),
            "stage_keys": stage_keys,
            "code_version": tags.get("quantmill.code_version"),
            "prefect_flow_run_id": tags.get("quantmill.prefect_flow_run_id"),
        },
        "evaluation": {k[len("eval.") :]: v for k, v in (run.data.params.items() if run else []) if k.startswith("eval.")},
        "metrics": dict(run.data.metrics) if run else {},
        "gate": {
            "status": tags.get(GATE_TAG, "none"),
            "reasons": tags.get("quantmill.gate.reasons", ""),
            "limits": json.loads(tags.get("quantmill.gate.limits", "{}")),
            "smoke_text": tags.get("quantmill.gate.smoke_text"),
        },
        "promotions": {k[len(PROMOTION_TAG) :]: json.loads(v) for k, v in tags.items() if k.startswith(PROMOTION_TAG)},
        "checkpoint_sha256": checkpoint_hashes(tags),
    }


def promote(uri: str, alias: str, force: bool = False) -> dict[str, Any]:
    """Point `alias` at the version `uri` names; a gate-failed version only with `force`. The
    promotion (time, the version the alias left, forced or not) is recorded as a version tag."""
    if not ALIAS_PATTERN.match(alias) or alias == "latest" or re.match(r"^v\d+$", alias):
        raise RegistryError(f"alias {alias!r} is not allowed: letters, digits, '_' and '-', not 'latest' or v<N>")
    c = client()
    version = get_version(uri)
    pinned = f"models:/{version.name}/{version.version}"
    if "quantmill.quantized_key" not in version.tags:
        raise RegistryError(f"{pinned} was not registered by quantmill")
    if not any(k.startswith(CHECKPOINT_TAG) for k in version.tags):
        raise RegistryError(f"{pinned} has no recorded checkpoint hashes: it cannot be verified when pulled; re-register it")
    if version.tags.get(GATE_TAG) == "failed" and not force:
        reasons = version.tags.get("quantmill.gate.reasons", "")
        raise RegistryError(f"{pinned} failed its quality gate ({reasons}): not promoted to {alias!r} (pass --force to promote it anyway)")
    try:
        previous = str(c.get_model_version_by_alias(version.name, alias).version)
    except Exception:
        previous = None
    record = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_version": previous, "forced": bool(force and version.tags.get(GATE_TAG) == "failed")}
    c.set_registered_model_alias(version.name, alias, version.version)
    c.set_model_version_tag(version.name, version.version, PROMOTION_TAG + alias, json.dumps(record))
    return {"uri": pinned, "alias": alias, **record}
