"""The evaluation protocol: non-overlapping windows of L tokens, the first K of the eval text.

Perplexity of a model, and, against the original, the mean KL divergence KL(P_fp || P_q) of the
next-token distributions and the top-1 agreement over every predicted position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class EvalMetrics:
    ppl: float
    nll: float
    tokens: int
    kl: float | None = None
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    seconds: float = 0.0
    reference_ppl: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def evaluate_windows(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    *,
    device: torch.device | str = "cpu",
    desc: str = "eval",
    on_window: Callable[[int, int], None] | None = None,
) -> EvalMetrics:
    """Perplexity of `model` on [K, L] windows; KL and top-1 agreement against `reference` if given.

    The models stay where they are; each window moves to `device`.
    """
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    ref_nll_sum = 0.0
    max_diff = 0.0
    start = time.perf_counter()
    for i, window in enumerate(tqdm(windows, desc=desc, unit="window", leave=False)):
        ids = window.unsqueeze(0).to(device)
        logits = _logits(model, ids)[0, :-1]
        targets = ids[0, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll_sum += -logp.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
        if reference is not None:
            ref_logits = _logits(reference, ids)[0, :-1]
            ref_logp = F.log_softmax(ref_logits, dim=-1)
            ref_nll_sum += -ref_logp.gather(1, targets[:, None]).sum().item()
            kl_sum += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
            agree += (logits.argmax(-1) == ref_logits.argmax(-1)).sum().item()
            max_diff = max(max_diff, (logits - ref_logits).abs().max().item())
        if on_window is not None:
            on_window(i + 1, len(windows))
    metrics = EvalMetrics(ppl=math.exp(nll_sum / count), nll=nll_sum / count, tokens=count, seconds=time.perf_counter() - start)
    if reference is not None:
        metrics.kl = kl_sum / count
        metrics.top1_agreement = agree / count
        metrics.max_abs_logit_diff = max_diff
        metrics.reference_ppl = math.exp(ref_nll_sum / count)
    return metrics


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, windows: torch.Tensor) -> float:
    """Largest |logit_a - logit_b| over the windows (checks two loaders of one checkpoint agree)."""
    return max((_logits(a, w[None]) - _logits(b, w[None])).abs().max().item() for w in windows)


SMOKE_PROMPT = "The meaning of a quantized model is"
SMOKE_TOKENS = 32


@dataclass
class SmokeResult:
    """What greedy generation from a fixed prompt gave: a model that passes the perplexity gate can
    still emit NaN logits or nothing at all (a broken kernel, a zeroed layer)."""

    prompt: str
    text: str
    tokens: int
    finite_logits: bool

    @property
    def failures(self) -> list[str]:
        out = []
        if not self.finite_logits:
            out.append("generation produced non-finite logits")
        if not self.text.strip():
            out.append(f"greedy generation of {self.tokens} tokens gave empty text")
        return out


@torch.no_grad()
def generation_smoke_test(model: nn.Module, tokenizer, prompt: str = SMOKE_PROMPT, tokens: int = SMOKE_TOKENS) -> SmokeResult:
    """Greedy `tokens` new tokens from `prompt` (end-of-text suppressed so the length is fixed)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    finite = all(bool(torch.isfinite(step).all()) for step in out.logits)
    new = out.sequences[0, ids.shape[1] :]
    return SmokeResult(prompt, tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), finite)
