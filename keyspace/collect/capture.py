"""Key and query capture: a context manager that streams pre- and post-RoPE keys (and,
when asked, queries) out of a model.

Pre-RoPE keys come from a forward hook on the key projection (sliced out of fused
projections, after `k_norm` where the model has one); pre-RoPE queries likewise from the query
projection (after `q_norm`). Post-RoPE keys and queries come from an attention function
registered with transformers' `AttentionInterface`: it records `key_states`
(batch, kv_heads, seq, head_dim), before any repeat to query heads, and `query_states`
(batch, heads, seq, head_dim), and delegates to the model's own attention implementation.
Everything is undone on exit, also when the body raises.

Query head h belongs to KV head h // G (G = heads // kv_heads), as in transformers' `repeat_kv`;
`pool_groups` turns per-query-head vectors into per-KV-head samples under that rule.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch

from keyspace.models.arch import arch_spec, attention_modules, head_geometry

# on_keys(kind, layer, keys) with keys: (batch, seq, kv_heads, head_dim)
KeysCallback = Callable[[str, int, torch.Tensor], None]
# on_queries(kind, layer, queries) with queries: (batch, seq, heads, head_dim)
QueriesCallback = Callable[[str, int, torch.Tensor], None]


def _pre_rotary(
    output: torch.Tensor, layout: str, heads: int, head_dim: int, kv_heads: int | None = None
) -> torch.Tensor:
    """Slice pre-RoPE queries (batch, seq, heads, head_dim), or with `kv_heads` keys (batch, seq,
    kv_heads, head_dim), out of the hooked module's output."""
    batch, seq = output.shape[:2]
    count, slot = (heads, 0) if kv_heads is None else (kv_heads, 1)  # slot: 0 queries, 1 keys
    if layout == "heads":
        return output
    if layout == "kv":
        return output.view(batch, seq, count, head_dim)
    if layout == "phi3_qkv":  # fused [q of all heads | k of all KV heads | v]
        start = slot * heads * head_dim
        return output[..., start : start + count * head_dim].reshape(batch, seq, count, head_dim)
    # gpt_neox: per head [q | k | v] of head_dim each
    per_head = output.view(batch, seq, heads, 3 * head_dim)
    return per_head[..., slot * head_dim : (slot + 1) * head_dim]


def pool_groups(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-query-head vectors (tokens, heads, head_dim) -> per-KV-head samples
    (tokens * G, kv_heads, head_dim): KV head j gets the vectors of query heads jG .. jG+G-1."""
    tokens, heads, head_dim = queries.shape
    group = heads // kv_heads
    grouped = queries.reshape(tokens, kv_heads, group, head_dim)  # (T, Hkv, G, D)
    return grouped.transpose(1, 2).reshape(tokens * group, kv_heads, head_dim)


def _delegate(model: Any, implementation: str, module: Any) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


@contextlib.contextmanager
def capture_keys(
    model: Any, on_keys: KeysCallback, on_queries: QueriesCallback | None = None
) -> Iterator[None]:
    """Call `on_keys(kind, layer, keys)`, and `on_queries(kind, layer, queries)` when given, for
    every forward inside the block; restore the model after."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    spec = arch_spec(model.config)
    heads, kv_heads, head_dim = head_geometry(model.config)
    modules = attention_modules(model, spec)
    original = model.config._attn_implementation
    name = f"keyspace_capture_{uuid.uuid4().hex[:8]}"

    def post_hook(
        module: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        on_keys("post", module.layer_idx, key.transpose(1, 2))  # key: (B, Hkv, T, D)
        if on_queries is not None:
            on_queries("post", module.layer_idx, query.transpose(1, 2))  # query: (B, H, T, D)
        return _delegate(model, original, module)(module, query, key, *args, **kwargs)

    def pre_hook(layer: int) -> Callable:
        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            on_keys("pre", layer, _pre_rotary(output, spec.layout, heads, head_dim, kv_heads))

        return hook

    def query_hook(layer: int) -> Callable:
        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            on_queries("pre", layer, _pre_rotary(output, spec.query_layout, heads, head_dim))

        return hook

    handles = []
    try:
        for layer, module in enumerate(modules):
            handles.append(getattr(module, spec.pre_module).register_forward_hook(pre_hook(layer)))
            if on_queries is not None:
                target = getattr(module, spec.query_module)
                handles.append(target.register_forward_hook(query_hook(layer)))
        AttentionInterface.register(name, post_hook)
        # The model builds its mask by implementation name: give ours the original's mask builder.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original or "eager"])
        model.set_attn_implementation(name)
        yield
    finally:
        for handle in handles:
            handle.remove()
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
