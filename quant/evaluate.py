"""The evaluation protocol: non-overlapping windows of L tokens, the first K of the eval text.

Perplexity of a model, and, against the original, the mean KL divergence KL(P_fp || P_q) of the
next-token distributions and the top-1 agreement over every predicted position. Every measure is
also kept per window, so a ratio comes with a 95% interval paired over windows (the windows are
the independent units; tokens inside one are not).

The float model runs once per (model, eval text): `reference_distributions` keeps, per position,
its `REFERENCE_TOPK` most likely tokens and their log-probabilities, and each quantized model is
then scored in a single forward pass of its own (`evaluate_against`). KL against that record is
the KL of the two distributions coarsened to those k tokens plus one bucket for the rest: a lower
bound of the exact KL (data processing), exact when the rest is one token; `bench/kl_topk.py`
measures the gap (the README gives it).
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

REFERENCE_TOPK = 128
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
    # With a top-k reference record: the largest |logit difference| over the float model's top-k tokens.
    max_abs_logit_diff: float | None = None
    seconds: float = 0.0
    reference_ppl: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_ci95_low: float | None = None
    ppl_ratio_ci95_high: float | None = None
    kl_ci95_low: float | None = None
    kl_ci95_high: float | None = None
    kl_method: str | None = None  # "exact" | "top<k>+tail"
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
        logp = F.log_softmax(logits, dim=-1)
        n = targets.numel()
        tokens.append(n)
        nll.append(-_target_logp(logp, targets).sum().item() / n)
        if reference is not None:
            ref_logits = _logits(reference, ids)[0, :-1]
            ref_logp = F.log_softmax(ref_logits, dim=-1)
            ref_nll.append(-_target_logp(ref_logp, targets).sum().item() / n)
            kl.append(F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item() / n)
            agree.append((logits.argmax(-1) == ref_logits.argmax(-1)).sum().item() / n)
            max_diff = max(max_diff, (logits - ref_logits).abs().max().item())
        if on_window is not None:
            on_window(i + 1, len(windows))
    seconds = time.perf_counter() - start
    if reference is None:
        return _metrics(nll, tokens, seconds)
    return _metrics(nll, tokens, seconds, ref_nll, kl, agree, max_diff, "exact")


@dataclass
class ReferenceTopK:
    """The float model's next-token distributions on the eval windows, kept compactly: per
    predicted position its k most likely token ids and their log-probabilities, the logsumexp of
    its logits (to recover those logits), the log of the mass on all other tokens, and the
    log-probability of the actual next token."""

    windows: torch.Tensor  # [K, L] token ids
    top_ids: torch.Tensor  # [K, L-1, k] int32
    top_logp: torch.Tensor  # [K, L-1, k] float32
    lse: torch.Tensor  # [K, L-1] float32
    tail_logp: torch.Tensor  # [K, L-1] float32: log of the mass outside the top k
    target_logp: torch.Tensor  # [K, L-1] float32

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in asdict(self).items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceTopK":
        from safetensors.torch import load_file

        return cls(**load_file(str(path)))

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])


@torch.no_grad()
def reference_distributions(
    model: nn.Module,
    windows: torch.Tensor,
    k: int = REFERENCE_TOPK,
    *,
    device: torch.device | str = "cpu",
    desc: str = "eval float",
    on_window: Callable[[int, int], None] | None = None,
) -> tuple[EvalMetrics, ReferenceTopK]:
    """One pass of the float model: its perplexity, and the record every quantized model is
    compared against."""
    nll, tokens, ids_k, logp_k, lses, tails, target = [], [], [], [], [], [], []
    start = time.perf_counter()
    for i, window in enumerate(tqdm(windows, desc=desc, unit="window", leave=False)):
        ids = window.unsqueeze(0).to(device)
        logits = _logits(model, ids)[0, :-1]
        targets = ids[0, 1:]
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits - lse[:, None]
        t = _target_logp(logp, targets)
        top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        ids_k.append(top.indices.to(torch.int32).cpu())
        logp_k.append(top.values.cpu())
        lses.append(lse.cpu())
        tails.append(tail_logmass(logp, top.indices).float().cpu())
        target.append(t.cpu())
        tokens.append(targets.numel())
        nll.append(-t.sum().item() / targets.numel())
        if on_window is not None:
            on_window(i + 1, len(windows))
    record = ReferenceTopK(windows.clone(), torch.stack(ids_k), torch.stack(logp_k), torch.stack(lses), torch.stack(tails), torch.stack(target))
    return _metrics(nll, tokens, time.perf_counter() - start), record


def tail_logmass(logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability on every token outside `top_ids`, per position (summed directly
    over those tokens: 1 - sum(top) would cancel to 0 for peaked distributions)."""
    rest = logp.scatter(-1, top_ids.long(), float("-inf"))
    return torch.logsumexp(rest, dim=-1)


def coarse_kl(top_logp: torch.Tensor, top_ids: torch.Tensor, tail_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position over P's top-k tokens plus one bucket for all others: a lower bound
    of the exact KL, equal to it when the bucket holds one token."""
    p_logp = top_logp.double()
    q_logp = logp.gather(-1, top_ids.long()).double()
    head = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    p_tail = tail_logp.double()
    q_tail = tail_logmass(logp, top_ids).double()
    tail = torch.where(torch.isinf(p_tail), torch.zeros_like(p_tail), p_tail.exp() * (p_tail - q_tail))
    return head + tail


@torch.no_grad()
def evaluate_against(
    model: nn.Module,
    reference: ReferenceTopK,
    *,
    device: torch.device | str = "cpu",
    desc: str = "eval",
    on_window: Callable[[int, int], None] | None = None,
) -> EvalMetrics:
    """Perplexity, KL, top-1 agreement and paired intervals of `model` against the float model's
    record, in one forward pass of `model` per window."""
    nll, tokens, ref_nll, kl, agree = [], [], [], [], []
    max_diff = 0.0
    start = time.perf_counter()
    for i, window in enumerate(tqdm(reference.windows, desc=desc, unit="window", leave=False)):
        ids = window.unsqueeze(0).to(device)
        logits = _logits(model, ids)[0, :-1].cpu()
        targets = ids[0, 1:].cpu()
        logp = F.log_softmax(logits, dim=-1)
        n = targets.numel()
        tokens.append(n)
        nll.append(-_target_logp(logp, targets).sum().item() / n)
        ref_nll.append(-reference.target_logp[i].sum().item() / n)
        kl.append(coarse_kl(reference.top_logp[i], reference.top_ids[i], reference.tail_logp[i], logp).sum().item() / n)
        agree.append((logits.argmax(-1) == reference.top_ids[i, :, 0].long()).sum().item() / n)
        ref_logits = reference.top_logp[i] + reference.lse[i][:, None]
        max_diff = max(max_diff, (logits.gather(-1, reference.top_ids[i].long()) - ref_logits).abs().max().item())
        if on_window is not None:
            on_window(i + 1, len(reference.windows))
    return _metrics(nll, tokens, time.perf_counter() - start, ref_nll, kl, agree, max_diff, f"top{reference.k}+tail")


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
