"""Route a model's attention through keyspace, via transformers' public `AttentionInterface`.

One dispatcher is registered under the name `keyspace`. It looks up the handler that the active
`use_attention(model, handler)` block installed for that model's config, so several models (or
several settings in sequence) never share state. Nothing is registered at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

ATTENTION_NAME = "keyspace"

# handler(module, query, key, value, scaling) -> attn_output (batch, q_len, q_heads, head_dim)
Handler = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_ACTIVE: dict[int, Handler] = {}


def _dispatch(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function; query (B, Hq, T, D), key/value (B, Hkv, S, D)."""
    handler = _ACTIVE.get(id(module.config))
    if handler is None:
        raise RuntimeError("keyspace attention called outside a `use_attention` block.")
    if (
        attention_mask is not None
        and attention_mask.dtype == torch.bool
        and not bool(attention_mask.all())
    ):
        # Masks that are not plain causal (padding, packing) are not supported by the sparse paths.
        raise ValueError("keyspace attention supports unpadded batches only.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return handler(module, query, key, value, scale), None


@contextlib.contextmanager
def use_attention(model: torch.nn.Module, handler: Handler) -> Iterator[torch.nn.Module]:
    """Run `model` with `handler` as its attention; restore its previous attention on exit, also on error."""
    from transformers import AttentionInterface

    key = id(model.config)
    if key in _ACTIVE:
        raise RuntimeError(
            "this model already runs keyspace attention; nest blocks on distinct models only."
        )
    previous = model.config._attn_implementation
    # Opaque to torch.compile: handlers pick kernels and budgets from Python state at each call.
    AttentionInterface.register(ATTENTION_NAME, torch.compiler.disable(_dispatch))
    _ACTIVE[key] = handler
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        yield model
    finally:
        _ACTIVE.pop(key, None)
        model.set_attn_implementation(previous)
