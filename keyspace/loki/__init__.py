"""Loki sparse attention inside transformers models, and the baselines it is compared with.

- `Loki`: the one way in (`Loki.from_run(run).attach(model)`, `loki.generate(model, ids)`).
- `masked_attention(model, SparseSettings(...))`: masked mode, for perplexity over whole windows.
- `LokiCache` + `loki_decoding(model, cache)`: decode mode, real sparse decoding via the kernels.
- `METHODS`: the method registry (keyspace.loki.methods), one file per method: loki, full,
  exact-topk, h2o, pcaattn, sparq, streaming, loki-adaptive; `register_method` adds one.

A basis is a key transform A and a query transform B, each (layers, kv_heads, D, D), applied as
x~ = T x: `basis=A` everywhere, and `query_basis=B` (None: B = A, the paper's orthonormal PCA basis;
the query-aware basis passes B = A^-T, so q~·k~ = q·k). Values are never transformed.
"""

from keyspace.loki.api import Loki
from keyspace.loki.cache import LokiCache
from keyspace.loki.decode import loki_decoding
from keyspace.loki.masked import K_MODES, SparseSettings, masked_attention, row_budgets
from keyspace.loki.methods import METHODS, LayerInputs, Method, get_method, register_method
from keyspace.loki.registry import use_attention

__all__ = [
    "K_MODES",
    "METHODS",
    "LayerInputs",
    "Loki",
    "LokiCache",
    "Method",
    "SparseSettings",
    "get_method",
    "loki_decoding",
    "register_method",
    "row_budgets",
    "masked_attention",
    "use_attention",
]
