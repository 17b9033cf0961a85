"""The oracle: the top k tokens by their exact scores q·k (reads all keys, then k·S values)."""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, register_method
from keyspace.loki.methods.common import LayerInputs, keep_top, masked


def exact_topk(inp: LayerInputs) -> torch.Tensor:
    keep = keep_top(inp.exact_scores, inp.budget, inp.causal)
    return masked(inp.exact_scores, keep)


EXACT_TOPK = register_method(
    Method(
        "exact-topk",
        exact_topk,
        cost=lambda head_dim, d, k: (1.0 + k) / 2,
        decode="masked-row",
        style=Style("#7f7f7f", "D", "exact top-k"),
        uses_k=True,
    )
)
