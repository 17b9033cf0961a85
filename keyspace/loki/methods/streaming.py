"""StreamingLLM: the first NUM_SINKS tokens (attention sinks) plus the most recent ones."""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, register_method
from keyspace.loki.methods.common import LayerInputs, keep_top, masked

NUM_SINKS = 4  # StreamingLLM's attention sinks


def streaming(inp: LayerInputs) -> torch.Tensor:
    kv_len = inp.causal.shape[1]
    recency = torch.arange(kv_len, device=inp.query.device, dtype=torch.float32)
    recency = torch.where(recency < NUM_SINKS, recency + 2 * kv_len, recency)
    keep = keep_top(recency.expand(inp.causal.shape), inp.budget, inp.causal)
    return masked(inp.exact_scores, keep[None, None].expand(inp.exact_scores.shape))


STREAMING = register_method(
    Method(
        "streaming",
        streaming,
        cost=lambda head_dim, d, k: k,
        decode="masked-row",
        style=Style("#9467bd", "v", "StreamingLLM"),
        uses_k=True,
    )
)
