"""Accuracy measurements in masked mode: perplexity over windows, and recall of Loki's selection.

Compute only: these take a model and token windows, and return numbers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from keyspace.loki.decode import greedy, loki_decoding
from keyspace.loki.masked import SparseSettings, attend, layer_inputs, masked_attention
from keyspace.loki.methods.common import group_sum, keep_top, masked
from keyspace.loki.registry import use_attention
from keyspace.models.placement import input_device

Progress = Callable[[int, int], None]


@dataclass
class Perplexity:
    """Mean next-token NLL over every predicted token of every window; ppl = exp(nll)."""

    nll: float
    predicted_tokens: int
    tokens: int
    seconds: float

    def __post_init__(self) -> None:
        if self.predicted_tokens < 1:
            raise ValueError("perplexity needs at least one predicted token")

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def window_nll(model, window: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window: window (batch, T) -> (batch,) float64."""
    logits = model(window, use_cache=False).logits[:, :-1].float()
    targets = window[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.sum(dim=-1).double().cpu()


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    settings: SparseSettings,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> Perplexity:
    """Perplexity of `model` under `settings` over windows (n_windows, T), in batches."""
    start, total = time.perf_counter(), torch.zeros((), dtype=torch.float64)
    device = input_device(model)
    # `full` runs the model's own attention: the fastest dense path, equal to ours (tests/test_loki_masked.py).
    dense = settings.method == "full"
    with contextlib.nullcontext() if dense else masked_attention(model, settings):
        for first in range(0, windows.shape[0], batch_size):
            total += window_nll(model, windows[first : first + batch_size].to(device)).sum()
            if progress is not None:
                progress(min(first + batch_size, windows.shape[0]), windows.shape[0])
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return Perplexity(
        float(total) / predicted, predicted, windows.numel(), time.perf_counter() - start
    )


@dataclass
class Recall:
    """Loki's selection against the exact top-k, per (layer, query head), averaged over the rows
    whose budget is smaller than their context (other rows keep everything and are not counted).

    topk:       (layers, q_heads)  |Loki's set ∩ exact top-k set| / budget
    mass:       (layers, q_heads)  share of the exact softmax mass that falls in Loki's set
    exact_mass: (layers, q_heads)  share in the exact top-k set: the most any set of that size holds
    rows: number of rows counted per (layer, query head)
    """

    topk: torch.Tensor
    mass: torch.Tensor
    exact_mass: torch.Tensor
    rows: int

    def __post_init__(self) -> None:
        if not self.topk.shape == self.mass.shape == self.exact_mass.shape or self.topk.dim() != 2:
            raise ValueError("topk, mass and exact_mass must all be (layers, q_heads)")


class _RecallRecorder:
    """An attention handler that returns dense attention and accumulates Loki's recall per layer."""

    def __init__(self, settings: SparseSettings, layers: int, q_heads: int):
        self.settings = settings
        self.topk_sum = torch.zeros(layers, q_heads, dtype=torch.float64)
        self.mass_sum = torch.zeros(layers, q_heads, dtype=torch.float64)
        self.exact_mass_sum = torch.zeros(layers, q_heads, dtype=torch.float64)
        self.rows = 0

    def __call__(self, module, query, key, value, scale):
        inputs = layer_inputs(self.settings, module.layer_idx, query, key, scale)
        logits = masked(inputs.exact_scores, inputs.causal)
        probs = torch.softmax(logits.float() * scale, dim=-1)  # [B, Hq, T, S]
        approx = inputs.pca_scores
        if inputs.group_select:
            approx = group_sum(approx, inputs.group_size)
        chosen = keep_top(approx, inputs.budget, inputs.causal)
        exact = keep_top(inputs.exact_scores, inputs.budget, inputs.causal)
        counted = inputs.budget < inputs.causal.sum(dim=-1)  # [T]
        overlap = (chosen & exact).sum(-1).double() / inputs.budget.double()  # [B, Hq, T]
        mass = (probs * chosen).sum(-1).double()
        self.topk_sum[module.layer_idx] += overlap[..., counted].sum(dim=(0, 2)).cpu()
        self.mass_sum[module.layer_idx] += mass[..., counted].sum(dim=(0, 2)).cpu()
        exact_mass = (probs * exact).sum(-1).double()[..., counted]
        self.exact_mass_sum[module.layer_idx] += exact_mass.sum(dim=(0, 2)).cpu()
        if module.layer_idx == 0:
            self.rows += int(counted.sum()) * query.shape[0]
        return attend(logits, value, scale)

    def result(self) -> Recall:
        if self.rows == 0:  # every row keeps its whole context: selection is exact
            ones = torch.ones_like(self.topk_sum)
            return Recall(ones, ones.clone(), ones.clone(), 0)
        sums = (self.topk_sum, self.mass_sum, self.exact_mass_sum)
        return Recall(*(t / self.rows for t in sums), self.rows)


@torch.no_grad()
def loki_recall(model, windows: torch.Tensor, settings: SparseSettings) -> Recall:
    """Top-k and attention-mass recall of Loki's selection over windows (n_windows, T), one window at a time."""
    if settings.method != "loki":
        raise ValueError("recall is measured for the loki method")
    config = model.config
    recorder = _RecallRecorder(settings, config.num_hidden_layers, config.num_attention_heads)
    device = input_device(model)
    with use_attention(model, recorder):
        for window in windows:
            model(window[None].to(device), use_cache=False)
    return recorder.result()


@dataclass
class DecodeCheck:
    """Greedy decoding with the dense cache vs LokiCache over some prompts.

    token_agreement: share of positions where Loki's free-running greedy token equals the dense one
        (after a first disagreement the two continuations drift apart, so this is a harsh measure)
    forced_agreement: share of steps where Loki's argmax equals the dense argmax, both fed the dense
        continuation (teacher forcing): per-step agreement without drift
    nll_sparse / nll_dense: mean NLL of the dense greedy continuation, teacher-forced through each cache
    """

    prompts: int
    prompt_tokens: int
    tokens: int
    token_agreement: float
    forced_agreement: float
    nll_sparse: float
    nll_dense: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.token_agreement <= 1.0:
            raise ValueError("token_agreement is a share")


def decode_check(model, prompts: torch.Tensor, new_tokens: int, make_cache) -> DecodeCheck:
    """prompts (M, P); make_cache() -> a fresh LokiCache. Dense runs use transformers' DynamicCache."""
    agree, forced_agree, sparse_nll, dense_nll = [], [], [], []
    for prompt in prompts:
        prompt = prompt[None]
        dense_tokens, dense_token_nll = greedy(model, DynamicCache(), prompt, new_tokens)
        cache = make_cache()
        with loki_decoding(model, cache):
            loki_tokens, _ = greedy(model, cache, prompt, new_tokens)
            cache.crop(
                0
            )  # the same cache, emptied: teacher-force the dense continuation through Loki
            forced_choice, forced_nll = greedy(
                model, cache, prompt, new_tokens, forced=dense_tokens, report_argmax=True
            )
        agree.append((loki_tokens == dense_tokens).double().mean())
        forced_agree.append((forced_choice == dense_tokens).double().mean())
        sparse_nll.append(forced_nll.mean())
        dense_nll.append(dense_token_nll.mean())
    mean = lambda xs: float(torch.stack(xs).mean())  # noqa: E731
    return DecodeCheck(
        len(prompts),
        prompts.shape[1],
        new_tokens,
        mean(agree),
        mean(forced_agree),
        mean(sparse_nll),
        mean(dense_nll),
    )
