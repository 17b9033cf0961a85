"""Loki decode kernels: Triton on CUDA, plain torch elsewhere. They know nothing of models.

`loki_decode` runs one decode step; its stages are `lowrank_scores`, `select_topk` and
`sparse_attention`. Each has a `*_reference` in plain torch beside it.
"""

from keyspace.kernels.decode import dense_attention_reference, loki_decode, loki_decode_reference
from keyspace.kernels.lowrank_scores import lowrank_scores, lowrank_scores_reference
from keyspace.kernels.select import select_topk, select_topk_reference
from keyspace.kernels.sparse_attention import sparse_attention, sparse_attention_reference

__all__ = [
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
