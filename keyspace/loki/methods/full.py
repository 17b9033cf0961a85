"""Dense causal attention: every token of the context, every dimension."""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, register_method
from keyspace.loki.methods.common import LayerInputs, masked


def full(inp: LayerInputs) -> torch.Tensor:
    return masked(inp.exact_scores, inp.causal)


FULL = register_method(
    Method(
        "full",
        full,
        cost=lambda head_dim, d, k: 1.0,
        decode="dense",
        style=Style("#000000", "*", "full"),
        top_k=False,
    )
)
