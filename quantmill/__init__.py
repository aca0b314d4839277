"""quantmill: post-training quantization of causal LMs as a cached, registered Prefect pipeline.

`quantmill.load("models:/NAME@ALIAS")` -> (model, tokenizer) of a registered quantized version,
hash-verified and cached locally by version.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(uri: str, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version; downloads once per version, verifies every file."""
    # Imported here, not at the top: every `quantmill.*` import runs this file, and fetch pulls in
    # mlflow and the registry, which the numerical layers must never load (tests/test_layering.py).
    from quantmill.fetch import load as _load

    return _load(uri, dtype=dtype)
