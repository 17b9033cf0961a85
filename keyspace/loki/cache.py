"""Decode mode: a transformers `Cache` that keeps keys transformed into a basis, split at d.

Per layer it stores, for batch B, KV heads Hkv, cached length S and head_dim D:
  k_low  (B, Hkv, S, d)      the first d coordinates k~ = A k, contiguous: the low-rank score pass reads only these
  k_rest (B, Hkv, S, D - d)  the remaining coordinates, read only for the selected rows
  values (B, Hkv, S, D)      never transformed
Queries go through the query transform B: q~ = B q. The paper's PCA basis is orthonormal (B = A);
the query-aware basis has B = A^-T. Either way q~ · k~ over all D coordinates equals q · k.
The rotations, checks and the budget rule are `keyspace.loki.core`'s, shared with the static cache.

Most users reach it through `keyspace.Loki` (`with loki.attach(model): model.generate(...)`); by hand:

    cache = LokiCache(basis, dims, k=0.125)
    with loki_decoding(model, cache):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import keyspace.kernels as kernels
from keyspace.loki.core import BudgetedCache, TransformedKeys, per_layer


class LokiLayer(TransformedKeys, CacheLayerMixin):
    """One layer's transformed, split key cache.

    basis:       (kv_heads, D, D) key transform A, rows = PCA directions for the paper's basis
    query_basis: (kv_heads, D, D) query transform B, or None for B = A
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, basis: torch.Tensor, d: int, query_basis: torch.Tensor | None = None):
        super().__init__()
        self._set_basis(basis, d, query_basis)
        self.k_low = self.k_rest = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        empty = key_states.new_zeros
        self.k_low, self.k_rest = (
            empty(batch, heads, 0, self.d),
            empty(batch, heads, 0, dim - self.d),
        )
        self.values = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
        self._cast_basis(key_states.device)
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append post-RoPE keys (B, Hkv, T, D) rotated and split, and values; returns (k_low, values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        low, rest = self.split_keys(key_states)
        self.k_low = torch.cat([self.k_low, low], dim=-2)
        self.k_rest = torch.cat([self.k_rest, rest], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.k_low, self.values

    def rotated_keys(self) -> torch.Tensor:
        """All cached keys in the basis, k~ = A k: (B, Hkv, S, D)."""
        return torch.cat([self.k_low, self.k_rest], dim=-1)

    def decode_step(
        self, query_rot: torch.Tensor, k_top: int, scale: float, group_select: bool
    ) -> torch.Tensor:
        """Loki attention of one rotated query row (B, Hq, D) over the whole cache -> (B, Hq, D)."""
        return kernels.loki_decode(
            query_rot,
            self.k_low,
            self.k_rest,
            self.values,
            k_top,
            scale=scale,
            group_select=group_select,
        )

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.values.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # The stored tensors and the axis of each that runs over tokens (crop, reset, reorder).
    token_axes = {"k_low": -2, "k_rest": -2, "values": -2}

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (negative: drop that many from the end)."""
        if not self.is_initialized:
            return
        keep = max_length if max_length >= 0 else self.get_seq_length() + max_length
        for name, axis in self.token_axes.items():
            stored = getattr(self, name)
            setattr(self, name, stored.narrow(axis, 0, min(max(0, keep), stored.shape[axis])))

    def reset(self) -> None:
        for name in self.token_axes:
            setattr(self, name, None)
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            index = beam_idx.to(self.values.device)
            for name in self.token_axes:
                setattr(self, name, getattr(self, name).index_select(0, index))

    def offload(self) -> None:  # the split layout stays on its device
        return None

    def prefetch(self) -> None:
        return None


class LokiCache(BudgetedCache, Cache):
    """A LokiLayer per model layer, plus the decode budget.

    basis: (layers, kv_heads, D, D) key transform A (PCA directions as rows for the paper's basis)
    dims:  d per layer (layers,), one split width for all KV heads of a layer
    k:     fraction of the cached tokens attended at each decode step, in (0, 1] ...
    budget: ... or tokens attended at each step (exactly one of k and budget)
    group_select: under GQA, one token set per KV head (summed group scores) instead of per query head
    query_basis: (layers, kv_heads, D, D) query transform B, or None for B = A (orthonormal A);
        the query-aware basis passes B = A^-T
    """

    def __init__(
        self,
        basis: torch.Tensor,
        dims: list[int] | torch.Tensor,
        k: float | None = None,
        group_select: bool = False,
        query_basis: torch.Tensor | None = None,
        budget: int | None = None,
    ):
        self._set_budget(k, budget, group_select)
        layers = [LokiLayer(*layer) for layer in per_layer(basis, dims, query_basis)]
        super().__init__(layers=layers)

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)
