"""Decode mode: dense prefill, then `keyspace.kernels.loki_decode` at every single-token step.

`keyspace.Loki.attach(model)` is the everyday way in; by hand:

cache = LokiCache(basis, dims_per_layer, k=0.125)
with loki_decoding(model, cache):
    ids = model.generate(prompt, past_key_values=cache, max_new_tokens=16, do_sample=False)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from keyspace.loki.cache import LokiCache
from keyspace.loki.core import causal_attention
from keyspace.loki.registry import use_attention
from keyspace.models.placement import input_device


def dense_handler(module, query, key, value, scale) -> torch.Tensor:
    """Dense attention as a keyspace handler (`use_attention(model, dense_handler)`): the same
    numbers as the model's own SDPA attention, without the (B, 1, T, S) mask some transformers
    versions build for it."""
    return causal_attention(query, key, value, scale)


def decode_handler(cache: LokiCache):
    """Attention for a model whose cache is `cache`: dense when q_len > 1, Loki kernels when q_len == 1."""

    def handler(module, query, key, value, scale):
        layer = cache.layers[module.layer_idx]
        query_rot = layer.rotated_query(query)
        if query.shape[-2] > 1:
            # Exact, in the transformed space: q~·k~ = q·k.
            return causal_attention(query_rot, layer.rotated_keys(), layer.values, scale)
        k_top = cache.tokens_kept(layer.get_seq_length())
        out = layer.decode_step(query_rot[:, :, 0], k_top, scale, cache.group_select)
        return out[:, None].to(query.dtype)  # [B, 1, Hq, D]

    return handler


@contextlib.contextmanager
def loki_decoding(model: torch.nn.Module, cache: LokiCache) -> Iterator[torch.nn.Module]:
    """Run `model` with `cache` as a Loki decode cache; the model's attention is restored on exit."""
    with use_attention(model, decode_handler(cache)):
        yield model


def cache_kwargs(model, cache) -> dict:
    """transformers renamed `past_key_values` to `cache`; pass whichever this version's forward takes."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def last_logits(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Run ids (B, T) into `cache`; return each row's next-token logits (B, vocab) in float32.

    Only the last position goes through the head (`logits_to_keep=1`): a batch of 8k-token prompts
    would otherwise spend B·T·vocab floats on logits nobody reads.
    """
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if takes_keep else {}
    return model(ids, **keep, **cache_kwargs(model, cache)).logits[:, -1].float()


@torch.no_grad()
def prefill(model, cache, prompt: torch.Tensor) -> torch.Tensor:
    """Run prompt (1, P) into `cache`; return the next-token logits (vocab,) in float32."""
    return last_logits(model, cache, prompt)[0]


@torch.no_grad()
def batch_greedy(
    model, cache, prompts: torch.Tensor | None, new_tokens: int, logits=None
) -> torch.Tensor:
    """Greedy decoding of a batch of equal-length prompts (B, P): `new_tokens` tokens per row,
    (B, new_tokens) on the CPU. With `logits` (B, vocab), the prompts are already in `cache`."""
    if logits is None:
        logits = last_logits(model, cache, prompts)
    tokens = []
    for step in range(new_tokens):
        tokens.append(logits.argmax(dim=-1))
        if step + 1 < new_tokens:
            logits = last_logits(model, cache, tokens[-1][:, None])
    return torch.stack(tokens, dim=1).cpu()


@torch.no_grad()
def continue_greedy(
    model, cache, logits, new_tokens: int, forced=None, report_argmax: bool = False
):
    """Greedy decoding of `new_tokens` from the prefill's `logits`, one token per forward.

    With `forced` (new_tokens,), feed those tokens instead of the argmax (teacher forcing).
    Returns (tokens (new_tokens,), nll (new_tokens,)): the tokens fed (or, with report_argmax, the
    model's own argmax at each step), and each fed token's NLL.
    """
    device = input_device(model)
    tokens, nll = [], []
    for step in range(new_tokens):
        token = logits.argmax() if forced is None else forced[step].to(logits.device)
        nll.append(-torch.log_softmax(logits, dim=-1)[token])
        tokens.append(logits.argmax() if report_argmax else token)
        if step + 1 < new_tokens:
            logits = last_logits(model, cache, token.view(1, 1).to(device))[0]
    return torch.stack(tokens).cpu(), torch.stack(nll).double().cpu()


def greedy(
    model, cache, prompt: torch.Tensor, new_tokens: int, forced=None, report_argmax: bool = False
):
    """Prefill prompt (1, P) into `cache`, then `continue_greedy`."""
    return continue_greedy(
        model, cache, prefill(model, cache, prompt), new_tokens, forced, report_argmax
    )
