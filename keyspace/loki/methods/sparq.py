"""SparQ (Ribar et al. 2023), steps 1 and 2: approximate scores from each query row's r = d
largest-|q| coordinates, then the exact top k."""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, loki_cost, register_method
from keyspace.loki.methods.common import LayerInputs, keep_top, masked, top_coordinates


def sparq_scores(query: torch.Tensor, key: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """SparQ's approximate scores: each query row's dims[h] largest-|q| coordinates against the
    same coordinates of every key. query (B, H, T, D), key (B, H, S, D) -> (B, H, T, S)."""
    return (query * top_coordinates(query.abs(), dims)) @ key.transpose(-1, -2)


def sparq(inp: LayerInputs) -> torch.Tensor:
    if inp.dims is None:
        raise ValueError("sparq needs d")
    keep = keep_top(sparq_scores(inp.query, inp.key, inp.dims), inp.budget, inp.causal)
    return masked(inp.exact_scores, keep)


SPARQ = register_method(
    Method(
        "sparq",
        sparq,
        cost=loki_cost,
        decode="masked-row",
        style=Style("#1f77b4", "s", "SparQ"),
        uses_d=True,
        uses_k=True,
    )
)
