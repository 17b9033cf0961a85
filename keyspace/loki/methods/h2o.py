"""H2O: heavy hitters plus recent tokens, half of the budget each."""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, register_method
from keyspace.loki.methods.common import LayerInputs, keep_top, masked


def h2o(inp: LayerInputs) -> torch.Tensor:
    """Heavy hitters + recent, half each; heavy = accumulated attention of all earlier queries.

    Masked-mode H2O: the accumulated score of key j at row i is the sum over rows i' <= i of the
    dense softmax weight p[i', j], the oracle form of H2O's running sum.
    """
    probs = torch.softmax(masked(inp.exact_scores, inp.causal).float() * inp.scale, dim=-1)
    accumulated = probs.cumsum(dim=-2)  # [B, H, T, S]
    recent = inp.budget - inp.budget // 2
    positions = torch.arange(inp.causal.shape[1], device=probs.device)
    last = inp.causal.sum(dim=-1) - 1  # [T], index of the row's own token
    is_recent = (positions[None, :] > (last - recent)[:, None]) & inp.causal
    return masked(
        inp.exact_scores,
        keep_top(accumulated.masked_fill(is_recent, float("inf")), inp.budget, inp.causal),
    )


H2O = register_method(
    Method(
        "h2o",
        h2o,
        cost=lambda head_dim, d, k: k,
        decode="heavy-hitters",
        style=Style("#2ca02c", "^", "H2O"),
        uses_k=True,
    )
)
