"""Decoders: `(model, ids (B, P), new_tokens) -> generated token ids (B, new_tokens)`, greedy.

The B prompts of one call have the same length (a task cell's prompts all do) and decode together.

- `cache_decoder(make_cache)`: real decoding; dense with transformers' DynamicCache (attention
  through `dense_handler`, the model's SDPA math without a materialized mask), or Loki with a
  fresh LokiCache per batch from `make_cache` (a `keyspace.Loki`'s `loki.cache`) under
  `loki_decoding` (the kernels at every step).
- `masked_decoder(settings)`: for the baselines without a decode path. The prompt is prefilled
  densely; each later token is a decode step whose query keeps the method's top ceil(k·context)
  (or min(budget, context)) keys, in masked mode, one row against the dense cache. h2o ranks
  keys by the attention they got from all earlier rows, so its steps keep that running sum
  (`HeavyHitters`), at a fraction or a token budget alike. The reference for both re-runs the
  whole sequence at every step with the prompt rows dense (`SparseSettings.dense_rows`); tests
  check that they agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformers import DynamicCache

from keyspace.loki.decode import batch_greedy, dense_handler, last_logits, loki_decoding
from keyspace.loki.masked import SparseSettings, masked_attention
from keyspace.loki.methods import get_method
from keyspace.loki.registry import use_attention
from keyspace.tasks.heavy_hitters import HeavyHitters

Decoder = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]


def _on_device(model, ids: torch.Tensor) -> torch.Tensor:
    if ids.dim() != 2:
        raise ValueError(f"ids must be (batch, tokens), got {tuple(ids.shape)}")
    return ids.to(next(model.parameters()).device)


def cache_decoder(make_cache: Callable[[], object] | None = None) -> Decoder:
    """Dense greedy decoding when make_cache is None; else a fresh cache per batch under loki_decoding."""

    def decode(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        if make_cache is None:
            with use_attention(model, dense_handler):
                return batch_greedy(model, DynamicCache(), _on_device(model, ids), new_tokens)
        cache = make_cache()
        with loki_decoding(model, cache):
            return batch_greedy(model, cache, _on_device(model, ids), new_tokens)

    return decode


def masked_decoder(settings: SparseSettings, whole_sequence: bool = False) -> Decoder:
    """Dense prefill, then decode steps at ceil(k·context), or min(budget, context) for a token
    budget (settings.k_mode is not used).

    whole_sequence: re-run the whole sequence at every step (the slow reference) instead of one row
    against the cache.
    """
    if whole_sequence:
        return _whole_sequence_decoder(settings)
    if get_method(settings.method).decode == "heavy-hitters":
        return _heavy_hitters_decoder(settings)
    return _row_decoder(settings)


def _heavy_hitters_decoder(settings: SparseSettings) -> Decoder:
    """H2O's steps at ceil(k·context), or min(budget, context) for a token budget."""

    def decode(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with use_attention(model, HeavyHitters(settings.k, settings.budget)):
            return batch_greedy(model, DynamicCache(), _on_device(model, ids), new_tokens)

    return decode


def _row_decoder(settings: SparseSettings) -> Decoder:
    @torch.no_grad()
    def decode(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        cache = DynamicCache()
        with use_attention(model, dense_handler):
            logits = last_logits(model, cache, _on_device(model, ids))
        with masked_attention(model, settings):  # one query row per step: row_budgets = ceil(k·S)
            return batch_greedy(model, cache, None, new_tokens, logits=logits)

    return decode


def _whole_sequence_decoder(settings: SparseSettings) -> Decoder:
    @torch.no_grad()
    def decode(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        sequence = _on_device(model, ids)
        steps = dataclasses.replace(settings, k_mode="row", dense_rows=sequence.shape[1])
        logits = model(sequence, use_cache=False).logits[:, -1]
        tokens = []
        for step in range(new_tokens):
            tokens.append(logits.argmax(dim=-1))
            if step + 1 < new_tokens:
                sequence = torch.cat([sequence, tokens[-1][:, None]], dim=1)
                with masked_attention(model, steps):
                    logits = model(sequence, use_cache=False).logits[:, -1]
        return torch.stack(tokens, dim=1).cpu()

    return decode
