"""quantmill: post-training quantization of causal LMs as a cached, registered Prefect pipeline.

`quantmill.load("models:/NAME@ALIAS")` -> (model, tokenizer) of a registered quantized version,
hash-verified and cached locally by version.
"""

from __future__ import annotations

from typing import Any


def load(uri: str, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version; downloads once per version, verifies every file."""
    from quantmill.fetch import load as _load

    return _load(uri, dtype=dtype)
