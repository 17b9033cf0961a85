"""Prefill attention over a static cache with a bounded workspace, and the chunk rule that bounds
the rest of a prefill forward.

A prefill chunk's queries are the last T of the S cached tokens. SDPA has no GQA kernel for a
lower-right causal mask that is sure not to fall back to materializing the scores, so the keys and
values are repeated to the query heads, but one slice of KV heads at a time: each slice's repeated
K and V take at most `workspace` bytes (at least one KV head's worth, 2 · B · G · S · D elements),
never the whole batch's (4.3 GB at B=16, 16k, Llama-3-8B). The first chunk (T == S) is SDPA's
causal kernel with GQA, the cache read in place. The mask is (T, S) bool, shared by every slice.

The chunk rule: `chunk_length(batch, ...)` prompt tokens per forward, at most `tokens // batch`,
so the activations of a chunk (the MLP's B·T·2I above all: 7 GB for B=16 × 8192 tokens at
Llama-3-8B's I=14336) stay bounded whatever the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keyspace.loki.masked import causal_mask


def chunk_length(batch: int, chunk: int, tokens: int) -> int:
    """Prompt tokens per prefill forward: `chunk`, cut so batch × chunk ≤ `tokens` (at least 2)."""
    return max(2, min(chunk, tokens // max(batch, 1)))


def heads_per_slice(
    batch: int, groups: int, kv_len: int, dim: int, elem: int, kv_heads: int, workspace: int
) -> int:
    """KV heads per attention call, so each call's repeated K and V fit `workspace` bytes."""
    per_head = 2 * batch * groups * kv_len * dim * elem if groups > 1 else 0
    if per_head == 0:
        return kv_heads  # MHA: nothing is repeated
    return max(1, min(kv_heads, workspace // per_head))


def _keys(parts: tuple[torch.Tensor, ...], begin: int, end: int) -> torch.Tensor:
    """KV heads [begin, end) of the keys stored as `parts` along the last dim (Loki: low, rest)."""
    if len(parts) == 1:
        return parts[0][:, begin:end]
    return torch.cat([part[:, begin:end] for part in parts], dim=-1)


def prefill_attention(
    query: torch.Tensor,
    key_parts: tuple[torch.Tensor, ...],
    values: torch.Tensor,
    scale: float,
    workspace: int,
) -> torch.Tensor:
    """Exact causal attention of query (B, Hq, T, D), the last T of S positions, over the cache:
    keys = concat(key_parts, -1), each (B, Hkv, S, ·), values (B, Hkv, S, D) -> (B, T, Hq, D)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = values.shape[1], values.shape[2]
    groups = q_heads // kv_heads
    step = heads_per_slice(batch, groups, kv_len, dim, values.element_size(), kv_heads, workspace)
    mask = None if q_len == kv_len else causal_mask(q_len, kv_len, query.device)
    outs = []
    for begin in range(0, kv_heads, step):
        end = min(begin + step, kv_heads)
        q = query[:, begin * groups : end * groups]  # [B, G·h, T, D]
        keys, vals = _keys(key_parts, begin, end), values[:, begin:end]
        if mask is None:  # the whole sequence: causal GQA kernel, K and V in place
            out = F.scaled_dot_product_attention(
                q, keys, vals, is_causal=True, scale=scale, enable_gqa=groups > 1
            )
        else:
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)  # [B, G·h, S, D]: the workspace
                vals = vals.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)
        outs.append(out.transpose(1, 2))  # [B, T, G·h, D]
    return outs[0].contiguous() if len(outs) == 1 else torch.cat(outs, dim=2)
