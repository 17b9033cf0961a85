"""PCA attention: attention computed from the d-dimensional scores alone, over the whole context."""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, register_method
from keyspace.loki.methods.common import LayerInputs, masked


def pcaattn(inp: LayerInputs) -> torch.Tensor:
    return masked(inp.pca_scores, inp.causal)


PCAATTN = register_method(
    Method(
        "pcaattn",
        pcaattn,
        cost=lambda head_dim, d, k: (float(d or 0.0) + head_dim) / (2 * head_dim),
        decode="masked-row",
        style=Style("#ff7f0e", "P", "PCA attention"),
        uses_d=True,
        uses_basis=True,
        top_k=False,
    )
)
