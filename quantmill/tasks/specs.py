"""What a quantization request asks for besides the model, with every default and bound written
once: the default recipes, the devices, and the calibration and evaluation specs. A spec is both
a stage's input and the flow's form (the same pydantic model), so the CLI's options, the flow's
parameters, the deployments' forms (prefect.yaml and `quantmill serve` take them from the flow's
signature) and the stage tasks read the same defaults and refuse the same values.

It imports pydantic only: the CLI reads its option defaults from here at startup.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_RECIPES = ["w8a16-rtn", "w4a16-rtn-g64"]
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when present

DATASET_HELP = (
    "`stdlib:calib` / `stdlib:eval` (Python standard-library docstrings, disjoint parts), a path to a "
    "`.txt`, `.jsonl[#FIELD]` or `.parquet[#COLUMN]` file, or `hub:ID[:CONFIG]@SPLIT[#COLUMN]`."
)
DATASET_PATTERN = r"^(stdlib(:calib|:eval)?|hub:[^\s@#:]+(:[^\s@#]+)?@[^\s#]+(#\S+)?|(file:)?\S.*\.(txt|jsonl|parquet)(#\S+)?)$"
MAX_COUNT = 100_000  # samples or windows
MAX_SEQ_LEN = 1_048_576


def ui(title: str, description: str, **extra: Any) -> dict[str, Any]:
    """Title and description as JSON-schema extras: Prefect overwrites a Field's own title with the
    parameter name and its description with the docstring's, but keeps these."""
    return {"title": title, "description": description, **extra}


class CalibrationSpec(BaseModel):
    """Which text calibrates, and how much of it: N samples of L tokens chosen with `seed`."""

    model_config = ConfigDict(extra="forbid")

    dataset: Annotated[str, Field(pattern=DATASET_PATTERN, examples=["stdlib:calib", "/data/calib.jsonl#text"], json_schema_extra=ui("Calibration text", DATASET_HELP))] = "stdlib:calib"
    samples: Annotated[int, Field(gt=0, le=MAX_COUNT, json_schema_extra=ui("Samples (N)", "How many calibration samples."))] = 64
    seq_len: Annotated[int, Field(gt=1, le=MAX_SEQ_LEN, json_schema_extra=ui("Tokens per sample (L)", "Tokens per calibration sample; at most the model's max_position_embeddings."))] = 512
    seed: Annotated[int, Field(ge=0, json_schema_extra=ui("Seed", "Chooses which windows of the text become samples."))] = 0


class EvaluationSpec(BaseModel):
    """The evaluation protocol: the first `windows` non-overlapping windows of `seq_len` tokens."""

    model_config = ConfigDict(extra="forbid")

    dataset: Annotated[str, Field(pattern=DATASET_PATTERN, examples=["stdlib:eval"], json_schema_extra=ui("Evaluation text", DATASET_HELP))] = "stdlib:eval"
    windows: Annotated[int, Field(gt=0, le=MAX_COUNT, json_schema_extra=ui("Windows (K)", "How many evaluation windows (perplexity, KL and top-1 agreement over all of them)."))] = 32
    seq_len: Annotated[int, Field(gt=1, le=MAX_SEQ_LEN, json_schema_extra=ui("Tokens per window", "Tokens per evaluation window; at most the model's max_position_embeddings."))] = 512
