"""Loki (the paper): score every token on the first d coordinates of the calibrated basis, keep the
top k, attend exactly over them. Under GQA with group_select, one token set per KV head."""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, loki_cost, register_method
from keyspace.loki.methods.common import LayerInputs, group_sum, keep_top, masked


def loki(inp: LayerInputs) -> torch.Tensor:
    scores = inp.pca_scores
    if inp.group_select:
        scores = group_sum(scores, inp.group_size)
    keep = keep_top(scores, inp.budget, inp.causal)
    return masked(inp.exact_scores, keep)


LOKI = register_method(
    Method(
        "loki",
        loki,
        cost=loki_cost,
        decode="cache",
        style=Style("#d62728", "o", "Loki"),
        uses_d=True,
        uses_k=True,
        uses_basis=True,
        uses_group=True,
    )
)
