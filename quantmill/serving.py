"""The pyfunc loader of a registered quantmill model: `mlflow.pyfunc.load_model("models:/NAME@ALIAS")`
and `mlflow models serve` call `_load_pyfunc(folder)` on the downloaded version folder.

The folder is a plain quantized checkpoint plus MLflow's MLmodel; the model is built with
`quantmill.io.checkpoint.load_quantized`, which reads every format quantmill writes (compressed-tensors
and LLM.int8()).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class QuantizedLM:
    """Generates text for each prompt: greedy at temperature 0, sampled (top-p) above."""

    def __init__(self, folder: str | Path) -> None:
        # torch and transformers when MLflow builds the model, not when it imports this loader.
        from quantmill.io.checkpoint import load_quantized
        from quantmill.io.sources import load_tokenizer

        self.folder = Path(folder)
        self.model = load_quantized(self.folder).eval()
        self.tokenizer = load_tokenizer(self.folder)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0) -> str:
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        sample = temperature > 0
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=int(max_new_tokens),
            do_sample=sample,
            temperature=float(temperature) if sample else None,
            top_p=float(top_p) if sample else None,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def predict(self, data: Any, params: dict[str, Any] | None = None):
        """data: a DataFrame with a `prompt` column (what the signature declares), or a list of
        prompts, or one prompt; returns a DataFrame with a `text` column."""
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            prompts = [str(p) for p in (data["prompt"] if "prompt" in data.columns else data.iloc[:, 0])]
        elif isinstance(data, str):
            prompts = [data]
        else:
            prompts = [str(p) for p in data]
        settings = {k: v for k, v in (params or {}).items() if k in ("max_new_tokens", "temperature", "top_p") and v is not None}
        return pd.DataFrame({"text": [self.generate(p, **settings) for p in prompts]})


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> QuantizedLM:
    return QuantizedLM(path)
