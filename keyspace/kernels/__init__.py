"""Loki decode kernels: Triton on CUDA, plain torch elsewhere. They know nothing of models.

`loki_decode` runs one decode step; its stages are `lowrank_scores`, `select_topk` and
`sparse_attention`, public so that a benchmark can time each alone (`sparse_attention` takes the
score pass's `low_scores` as the step does). Each has a `*_reference` in plain torch beside it.
Every function takes `backend=` ("auto", "triton", "torch") and `settings=`, a frozen
`KernelSettings` of Triton launch parameters whose defaults (`DEFAULT_SETTINGS`) are the tuned
values; build variants with `dataclasses.replace(DEFAULT_SETTINGS, ...)`.

`adaptive_decode` is the adaptive step: r coordinates chosen per (batch, KV head) from the
query (`adaptive_coords`), scored from a coordinate-major store (`adaptive_scores`; both in one
kernel: `adaptive_fused_scores`), then the same select and attention.

Modules: `scores` (low-rank scores), `select` (top-k; kernels in `select_bisect`, `select_radix`,
`select_bracket`), `attention` (sparse attention), `decode` (the step), `adaptive` and
`adaptive_decode` (the adaptive scores and step), `settings`.
"""

from keyspace.kernels.adaptive import (
    adaptive_coords,
    adaptive_fused_scores,
    adaptive_scores,
    adaptive_scores_reference,
)
from keyspace.kernels.adaptive_decode import adaptive_decode, adaptive_decode_reference
from keyspace.kernels.attention import sparse_attention, sparse_attention_reference
from keyspace.kernels.decode import dense_attention_reference, loki_decode, loki_decode_reference
from keyspace.kernels.scores import lowrank_scores, lowrank_scores_reference
from keyspace.kernels.select import select_topk, select_topk_reference
from keyspace.kernels.settings import DEFAULT_SETTINGS, KernelSettings

__all__ = [
    "DEFAULT_SETTINGS",
    "KernelSettings",
    "adaptive_coords",
    "adaptive_decode",
    "adaptive_decode_reference",
    "adaptive_fused_scores",
    "adaptive_scores",
    "adaptive_scores_reference",
    "dense_attention_reference",
    "loki_decode",
    "loki_decode_reference",
    "lowrank_scores",
    "lowrank_scores_reference",
    "select_topk",
    "select_topk_reference",
    "sparse_attention",
    "sparse_attention_reference",
]
