"""Loki sparse attention inside transformers models, and the baselines it is compared with.

- `masked_attention(model, SparseSettings(...))`: masked mode, for perplexity over whole windows.
- `LokiCache` + `loki_decoding(model, cache)`: decode mode, real sparse decoding via the kernels.
- `METHODS`: loki, full, exact-topk, h2o, pcaattn, sparq, streaming; one selection function each.
"""

from keyspace.loki.cache import LokiCache
from keyspace.loki.decode import loki_decoding
from keyspace.loki.masked import K_MODES, SparseSettings, masked_attention, row_budgets
from keyspace.loki.registry import use_attention
from keyspace.loki.selection import METHODS, LayerInputs

__all__ = [
    "K_MODES",
    "METHODS",
    "LayerInputs",
    "LokiCache",
    "SparseSettings",
    "loki_decoding",
    "row_budgets",
    "masked_attention",
    "use_attention",
]
