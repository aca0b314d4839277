"""capture_calibration: a dataset spec -> N x L token ids as Parquet, with the text's hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from quantmill.core.hashing import sha256_text
from quantmill.io.sources import load_tokenizer
from quantmill.model.calibration import load_text, pack_samples, parse_spec, tokenize
from quantmill.tasks.resolve import checkpoint_dir
from quantmill.tasks.specs import CalibrationSpec, EvaluationSpec  # noqa: F401  (EvaluationSpec: imported from here by callers)
from quantmill.tasks.stage import Built, Work, stage
from quantmill.tasks.store import stage_key

STAGE = "capture_calibration"


def _params(spec: CalibrationSpec) -> dict[str, Any]:
    parsed = parse_spec(spec.dataset)
    return {"dataset": parsed.__dict__, "samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed}


def calibration_key(model_key: str, spec: CalibrationSpec) -> str:
    return stage_key(STAGE, _params(spec), {"model": model_key})


def read_token_table(path: Path) -> torch.Tensor:
    table = pq.read_table(path)
    return torch.tensor(table.column("input_ids").to_pylist(), dtype=torch.long)


@stage(STAGE)
def capture_calibration(model: dict[str, Any], spec: CalibrationSpec) -> Work:
    """Tokenize the calibration text with the model's tokenizer and pack N x L samples."""
    spec = CalibrationSpec.model_validate(spec)
    key = calibration_key(model["key"], spec)

    def build(tmp: Path) -> Built:
        text = load_text(parse_spec(spec.dataset))
        tokens = tokenize(load_tokenizer(checkpoint_dir(model)), text)
        samples = pack_samples(tokens, spec.samples, spec.seq_len, spec.seed, what=f"calibration text {spec.dataset}")
        pq.write_table(pa.table({"input_ids": samples.tolist()}), tmp / "samples.parquet")
        manifest = {"spec": spec.model_dump(), "text_sha256": sha256_text(text), "text_tokens": int(tokens.numel()), "model_key": model["key"]}
        return Built(manifest, f"captured {spec.samples} x {spec.seq_len} tokens from {spec.dataset} -> key {key[:12]}")

    return Work(key, build, label=spec.dataset)
