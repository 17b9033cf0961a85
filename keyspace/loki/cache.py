"""Decode mode: a transformers `Cache` that keeps keys transformed into a basis, split at d.

Per layer it stores, for batch B, KV heads Hkv, cached length S and head_dim D:
  k_low  (B, Hkv, S, d)      the first d coordinates k~ = A k, contiguous: the low-rank score pass reads only these
  k_rest (B, Hkv, S, D - d)  the remaining coordinates, read only for the selected rows
  values (B, Hkv, S, D)      never transformed
Queries go through the query transform B: q~ = B q. The paper's PCA basis is orthonormal (B = A);
the query-aware basis has B = A^-T. Either way q~ · k~ over all D coordinates equals q · k.

    cache = LokiCache(basis, dims, k=0.125)
    with loki_decoding(model, cache):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from keyspace.loki.selection import rotate


def check_query_basis(basis: torch.Tensor, query_basis: torch.Tensor | None) -> None:
    """The query transform is None (the key transform serves both) or has the key transform's shape."""
    if query_basis is not None and query_basis.shape != basis.shape:
        raise ValueError(
            f"query_basis {tuple(query_basis.shape)} must have the basis' shape {tuple(basis.shape)}"
        )


def per_layer(
    basis: torch.Tensor, dims, k: float, query_basis: torch.Tensor | None
) -> list[tuple[torch.Tensor, int, torch.Tensor | None]]:
    """(key transform, d, query transform or None) per layer, once the cache's arguments check."""
    dims = [int(d) for d in dims]
    if len(dims) != basis.shape[0]:
        raise ValueError("need one d per layer")
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    check_query_basis(basis, query_basis)
    queries = [None] * len(dims) if query_basis is None else query_basis
    return [(basis[i], d, queries[i]) for i, d in enumerate(dims)]


class LokiLayer(CacheLayerMixin):
    """One layer's transformed, split key cache.

    basis:       (kv_heads, D, D) key transform A, rows = PCA directions for the paper's basis
    query_basis: (kv_heads, D, D) query transform B, or None for B = A
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, basis: torch.Tensor, d: int, query_basis: torch.Tensor | None = None):
        super().__init__()
        check_query_basis(basis, query_basis)
        if not 1 <= d <= basis.shape[-1]:
            raise ValueError(f"d must be in [1, {basis.shape[-1]}], got {d}")
        self.basis, self.d = basis, int(d)
        self.query_basis = basis if query_basis is None else query_basis
        self.k_low = self.k_rest = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        empty = key_states.new_zeros
        self.k_low, self.k_rest = (
            empty(batch, heads, 0, self.d),
            empty(batch, heads, 0, dim - self.d),
        )
        self.values = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
        # float32 whatever the model dtype: `rotate` computes in float32 (exactness of q~·k~).
        self.basis = self.basis.to(key_states.device, torch.float32)
        self.query_basis = self.query_basis.to(key_states.device, torch.float32)
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append post-RoPE keys (B, Hkv, T, D) rotated and split, and values; returns (k_low, values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rotated = rotate(key_states, self.basis)  # [B, Hkv, T, D]
        self.k_low = torch.cat([self.k_low, rotated[..., : self.d]], dim=-2)
        self.k_rest = torch.cat([self.k_rest, rotated[..., self.d :]], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.k_low, self.values

    def rotated_keys(self) -> torch.Tensor:
        """All cached keys in the basis, k~ = A k: (B, Hkv, S, D)."""
        return torch.cat([self.k_low, self.k_rest], dim=-1)

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.values.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (negative: drop that many from the end)."""
        if not self.is_initialized:
            return
        keep = max_length if max_length >= 0 else self.get_seq_length() + max_length
        self.k_low, self.k_rest, self.values = (
            t[..., :keep, :] for t in (self.k_low, self.k_rest, self.values)
        )

    def reset(self) -> None:
        self.k_low = self.k_rest = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            index = beam_idx.to(self.values.device)
            self.k_low, self.k_rest, self.values = (
                t.index_select(0, index) for t in (self.k_low, self.k_rest, self.values)
            )

    def offload(self) -> None:  # the split layout stays on its device
        return None

    def prefetch(self) -> None:
        return None


class LokiCache(Cache):
    """A LokiLayer per model layer, plus the decode budget.

    basis: (layers, kv_heads, D, D) key transform A (PCA directions as rows for the paper's basis)
    dims:  d per layer (layers,), one split width for all KV heads of a layer
    k:     fraction of the cached tokens attended at each decode step, in (0, 1]
    group_select: under GQA, one token set per KV head (summed group scores) instead of per query head
    query_basis: (layers, kv_heads, D, D) query transform B, or None for B = A (orthonormal A);
        the query-aware basis passes B = A^-T
    """

    def __init__(
        self,
        basis: torch.Tensor,
        dims: list[int] | torch.Tensor,
        k: float,
        group_select: bool = False,
        query_basis: torch.Tensor | None = None,
    ):
        layers = [LokiLayer(*layer) for layer in per_layer(basis, dims, k, query_basis)]
        super().__init__(layers=layers)
        self.k, self.group_select = k, group_select

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)
