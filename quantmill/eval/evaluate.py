"""The evaluation protocol: non-overlapping windows of L tokens, the first K of the eval text.

Perplexity of a model, and, against the original, the mean KL divergence KL(P_fp || P_q) of the
next-token distributions and the top-1 agreement over every predicted position. Every measure is
also kept per window, so a ratio comes with a 95% interval paired over windows (the windows are
the independent units; tokens inside one are not).

The float model runs once per (model, eval text): `reference_distributions` keeps the input of
its output layer at every position, with that layer's weights, and each quantized model is then
scored in a single forward pass of its own plus one matmul for the float logits
(`evaluate_against`). KL stays exact.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

INTERVAL_LEVEL = 0.95


def paired_interval(values: list[float], level: float = INTERVAL_LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean of per-window values (None for fewer than two windows or a
    non-finite value)."""
    n = len(values)
    if n < 2 or not all(math.isfinite(v) for v in values):
        return None  # a NaN window is a broken evaluation: check_finite refuses it, not this
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


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
    ppl_ratio: float | None = None
    ppl_ratio_ci95_low: float | None = None
    ppl_ratio_ci95_high: float | None = None
    kl_ci95_low: float | None = None
    kl_ci95_high: float | None = None
    kl_method: str | None = None  # "exact" (the only method; kept so stored metrics say so)
    window_nll: list[float] = field(default_factory=list)
    window_reference_nll: list[float] = field(default_factory=list)
    window_kl: list[float] = field(default_factory=list)
    window_top1_agreement: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _metrics(nll: list[float], tokens: list[int], seconds: float, ref_nll: list[float] | None = None, kl: list[float] | None = None,
             agree: list[float] | None = None, max_diff: float | None = None, kl_method: str | None = None) -> EvalMetrics:
    """Totals and intervals from per-window means (windows of equal length weigh the same)."""
    count = sum(tokens)
    mean_nll = sum(n * t for n, t in zip(nll, tokens)) / count
    m = EvalMetrics(ppl=math.exp(mean_nll), nll=mean_nll, tokens=count, seconds=seconds, window_nll=nll)
    if ref_nll is None:
        return m
    ref_mean = sum(n * t for n, t in zip(ref_nll, tokens)) / count
    m.reference_ppl = math.exp(ref_mean)
    m.ppl_ratio = math.exp(mean_nll - ref_mean)
    m.kl = sum(k * t for k, t in zip(kl, tokens)) / count
    m.top1_agreement = sum(a * t for a, t in zip(agree, tokens)) / count
    m.max_abs_logit_diff, m.kl_method = max_diff, kl_method
    m.window_reference_nll, m.window_kl, m.window_top1_agreement = ref_nll, kl, agree
    ratio = paired_interval([q - r for q, r in zip(nll, ref_nll)])
    if ratio is not None:
        m.ppl_ratio_ci95_low, m.ppl_ratio_ci95_high = math.exp(ratio[0]), math.exp(ratio[1])
    kl_interval = paired_interval(kl)
    if kl_interval is not None:
        m.kl_ci95_low, m.kl_ci95_high = max(kl_interval[0], 0.0), kl_interval[1]
    return m


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _target_logp(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, targets[..., None])[..., 0]


def _compare(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float, float, float]:
    """One window, per token: (NLL, reference NLL, KL(P_ref || P), top-1 agreement), and the
    largest |logit difference|."""
    n = targets.numel()
    logp, ref_logp = F.log_softmax(logits, dim=-1), F.log_softmax(ref_logits, dim=-1)
    return (
        -_target_logp(logp, targets).sum().item() / n,
        -_target_logp(ref_logp, targets).sum().item() / n,
        F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item() / n,
        (logits.argmax(-1) == ref_logits.argmax(-1)).sum().item() / n,
        (logits - ref_logits).abs().max().item(),
    )


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
    """Perplexity of `model` on [K, L] windows; exact KL and top-1 agreement against a
    `reference` model if given (both run on every window).

    The models stay where they are; each window moves to `device`.
    """
    nll, tokens, ref_nll, kl, agree = [], [], [], [], []
    max_diff = 0.0
    start = time.perf_counter()
    for i, window in enumerate(tqdm(windows, desc=desc, unit="window", leave=False)):
        ids = window.unsqueeze(0).to(device)
        logits = _logits(model, ids)[0, :-1]
        targets = ids[0, 1:]
        tokens.append(targets.numel())
        if reference is None:
            nll.append(-_target_logp(F.log_softmax(logits, dim=-1), targets).sum().item() / targets.numel())
        else:
            c = _compare(logits, _logits(reference, ids)[0, :-1], targets)
            for out, value in zip((nll, ref_nll, kl, agree), c[:4]):
                out.append(value)
            max_diff = max(max_diff, c[4])
        if on_window is not None:
            on_window(i + 1, len(windows))
    seconds = time.perf_counter() - start
    if reference is None:
        return _metrics(nll, tokens, seconds)
    return _metrics(nll, tokens, seconds, ref_nll, kl, agree, max_diff, "exact")


@dataclass
class ReferenceRecord:
    """What the float model's pass leaves for every later comparison: the windows and, per
    predicted position, the input of its output layer, with that layer's weights. The float logits
    are then one matmul away, so KL stays exact without keeping [K, L, vocab] probabilities
    (demo: 38 MB of hidden states and the 113 MB head, against 1.6 GB of fp16 log-probabilities)."""

    windows: torch.Tensor  # [K, L] token ids
    hidden: torch.Tensor  # [K, L-1, H] float32: the output layer's input
    head_weight: torch.Tensor  # [V, H]
    head_bias: torch.Tensor | None = None  # [V]
    softcap: float | None = None  # final logit soft-capping (Gemma 2)

    def logits(self, i: int) -> torch.Tensor:
        out = F.linear(self.hidden[i], self.head_weight, self.head_bias)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"windows": self.windows, "hidden": self.hidden, "head_weight": self.head_weight}
        if self.head_bias is not None:
            tensors["head_bias"] = self.head_bias
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"softcap": str(self.softcap or "")})

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceRecord":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            cap = (f.metadata() or {}).get("softcap") or None
        return cls(tensors["windows"], tensors["hidden"], tensors["head_weight"], tensors.get("head_bias"), float(cap) if cap else None)


@torch.no_grad()
def reference_distributions(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    desc: str = "eval float",
    on_window: Callable[[int, int], None] | None = None,
) -> tuple[EvalMetrics, ReferenceRecord]:
    """One pass of the float model: its perplexity, and the record every quantized model is
    compared against (the output layer's inputs, caught by a hook, and its weights)."""
    head = model.get_output_embeddings()
    caught: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: caught.append(args[0].detach()))
    nll, tokens, hidden = [], [], []
    start = time.perf_counter()
    try:
        for i, window in enumerate(tqdm(windows, desc=desc, unit="window", leave=False)):
            ids = window.unsqueeze(0).to(device)
            logp = F.log_softmax(_logits(model, ids)[0, :-1], dim=-1)
            targets = ids[0, 1:]
            hidden.append(caught.pop()[0, :-1].float().cpu())
            tokens.append(targets.numel())
            nll.append(-_target_logp(logp, targets).sum().item() / targets.numel())
            if on_window is not None:
                on_window(i + 1, len(windows))
    finally:
        hook.remove()
    bias = getattr(head, "bias", None)
    record = ReferenceRecord(
        windows.clone(), torch.stack(hidden), head.weight.detach().float().cpu().clone(),
        None if bias is None else bias.detach().float().cpu().clone(), getattr(model.config, "final_logit_softcapping", None),
    )
    return _metrics(nll, tokens, time.perf_counter() - start), record


@torch.no_grad()
def evaluate_against(
    model: nn.Module,
    reference: ReferenceRecord,
    *,
    device: torch.device | str = "cpu",
    desc: str = "eval",
    on_window: Callable[[int, int], None] | None = None,
) -> EvalMetrics:
    """Perplexity, exact KL, top-1 agreement and paired intervals of `model` against the float
    model's record, in one forward pass of `model` per window (plus the float output layer's matmul)."""
    nll, tokens, ref_nll, kl, agree = [], [], [], [], []
    max_diff = 0.0
    start = time.perf_counter()
    for i, window in enumerate(tqdm(reference.windows, desc=desc, unit="window", leave=False)):
        ids = window.unsqueeze(0).to(device)
        logits = _logits(model, ids)[0, :-1].cpu()
        c = _compare(logits, reference.logits(i), ids[0, 1:].cpu())
        for out, value in zip((nll, ref_nll, kl, agree), c[:4]):
            out.append(value)
        tokens.append(ids.shape[1] - 1)
        max_diff = max(max_diff, c[4])
        if on_window is not None:
            on_window(i + 1, len(reference.windows))
    return _metrics(nll, tokens, time.perf_counter() - start, ref_nll, kl, agree, max_diff, "exact")


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
