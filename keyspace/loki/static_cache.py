"""Static caches for a fast decode loop: preallocated once, each token written in place.

Two transformers `Cache`s with the same bookkeeping, for the same model:
  StaticKVCache    dense keys and values, stored token-major (B, capacity, Hkv, D), flash's layout;
                   `keys` / `values` are (B, Hkv, capacity, D) views of that storage.
  StaticLokiCache  keys transformed into the basis (k~ = A k) and split at d, like `LokiCache`:
                   k_low  (B, Hkv, capacity, d)      each head's (capacity, d) block contiguous, so
                                                      `k_low[:, :, :L]` is read in place by the kernels
                   k_rest (B, Hkv, capacity, D - d)
                   values (B, Hkv, capacity, D)

`update` returns whole buffers, as transformers' `StaticLayer` does (one shape at every step, so a
compiled caller never respecializes); attention reads the valid part. Each layer keeps its valid
length twice: `seqlens` (B,) int64 on the device, the truth that a
captured CUDA graph reads and advances, and `length`, a host mirror for transformers' Python side
(`get_seq_length`, eager slicing). `update` writes at `seqlens` and advances both; a graph replay
advances only the device side, so its owner calls `set_length` afterwards. Rows share one length
(unpadded batches).

`view_length` (None, or a bucket end set by the decode loop) is how far attention looks: None means
the exact length, as in eager use through `generate()`; see `keyspace.loki.graphs`.

    cache = StaticLokiCache(basis, dims, k=0.125, capacity=4096)
    with use_attention(model, static_attention(cache)):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import keyspace.kernels as kernels
from keyspace.loki.core import BudgetedCache, TransformedKeys, per_layer


class _StaticLayer(CacheLayerMixin):
    """Bookkeeping shared by both static layers: capacity, device and host lengths, positions."""

    is_sliding = False
    is_croppable = True
    is_compileable = False  # a compileable cache makes generate() compile the model on CUDA

    def __init__(self, capacity: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity, self.length = int(capacity), 0
        self.seqlens = None  # (B,) int64 on the device, once initialized

    def _init_lengths(self, batch: int, device: torch.device) -> None:
        self.batch_size, self.device = batch, device
        self.seqlens = torch.zeros(batch, dtype=torch.long, device=device)
        self._steps = torch.arange(self.capacity, device=device)  # write offsets of a chunk

    def _positions(self, tokens: int) -> torch.Tensor:
        """Where the next `tokens` tokens go: (tokens,) long on the device, read from `seqlens`."""
        if self.length + tokens > self.capacity:
            raise ValueError(
                f"the static cache holds {self.capacity} tokens; {self.length} + {tokens} do not fit"
            )
        start = self.seqlens[:1]  # rows share one length
        return start if tokens == 1 else start + self._steps[:tokens]

    def _advance(self, tokens: int) -> None:
        self.seqlens.add_(tokens)
        self.length += tokens

    def set_length(self, length: int) -> None:
        """Declare the first `length` tokens valid (host mirror and device lengths)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"length must be in [0, {self.capacity}], got {length}")
        self.length = int(length)
        if self.is_initialized:
            self.seqlens.fill_(self.length)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0  # `update` returns the whole buffers, as transformers' StaticLayer

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (negative: drop that many from the end)."""
        keep = max_length if max_length >= 0 else self.length + max_length
        self.set_length(max(0, min(keep, self.length)))

    def reset(self) -> None:
        self.set_length(0)

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder rows in place: the buffers keep their addresses, so captured graphs stay valid."""
        if self.is_initialized:
            index = beam_idx.to(self.device)
            for buffer in self._buffers():
                buffer.copy_(buffer.index_select(0, index))

    def offload(self) -> None:  # preallocated for a captured graph: stays on its device
        return None

    def prefetch(self) -> None:
        return None


class StaticKVLayer(_StaticLayer):
    """One layer's dense keys and values, preallocated to `capacity` tokens."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        shape = (batch, self.capacity, heads, dim)
        self.key_store = key_states.new_zeros(shape)  # [B, capacity, Hkv, D]
        self.value_store = value_states.new_zeros(shape[:-1] + (value_states.shape[-1],))
        self.keys, self.values = self.key_store.transpose(1, 2), self.value_store.transpose(1, 2)
        self._init_lengths(batch, key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write keys and values (B, Hkv, T, D) at the valid length; return the whole buffers as
        (B, Hkv, capacity, D) views: one shape at every step, so compiled callers never respecialize."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self._positions(key_states.shape[-2])
        self.key_store.index_copy_(1, positions, key_states.transpose(1, 2))
        self.value_store.index_copy_(1, positions, value_states.transpose(1, 2))
        self._advance(key_states.shape[-2])
        return self.keys, self.values

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.key_store, self.value_store


class StaticLokiLayer(TransformedKeys, _StaticLayer):
    """One layer's transformed, split keys and values, preallocated.

    basis:       (Hkv, D, D) key transform A, rows = directions
    query_basis: (Hkv, D, D) query transform B, or None for B = A

    The store is five hooks, `lazy_initialization`, `_write`, `rotated_keys`, `decode_step` and
    `_buffers`: another layout (`keyspace.loki.adaptive_cache`'s coordinate-major store for a
    per-step choice of coordinates) is a subclass that overrides them and keeps the rotations,
    checks, lengths and budget rule.
    """

    def __init__(
        self, basis: torch.Tensor, d: int, capacity: int, query_basis: torch.Tensor | None = None
    ):
        super().__init__(capacity)
        self._set_basis(basis, d, query_basis)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        empty = key_states.new_zeros
        self.k_low = empty(batch, heads, self.capacity, self.d)  # [B, Hkv, capacity, d]
        self.k_rest = empty(batch, heads, self.capacity, dim - self.d)
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self._cast_basis(key_states.device)
        self._init_lengths(batch, key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write post-RoPE keys (B, Hkv, T, D) rotated, and values; return the whole key store
        (`_buffers()[0]`) and values buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self._positions(key_states.shape[-2])
        self._write(positions, self.rotate_keys(key_states), value_states)
        self._advance(key_states.shape[-2])
        return self._buffers()[0], self.values

    def _write(self, positions, rotated, values) -> None:
        """Store rotated keys (B, Hkv, T, D), split at d, and values (B, Hkv, T, D) at positions (T,)."""
        self.k_low.index_copy_(2, positions, rotated[..., : self.d])
        self.k_rest.index_copy_(2, positions, rotated[..., self.d :])
        self.values.index_copy_(2, positions, values)

    def key_parts(self, end: int | None = None) -> tuple[torch.Tensor, ...]:
        """The first `end` (default: the valid length) cached keys k~ = A k as views whose concat
        over the last dim is the keys: (k_low (B, Hkv, end, d), k_rest (B, Hkv, end, D - d))."""
        end = self.length if end is None else end
        return self.k_low[:, :, :end], self.k_rest[:, :, :end]

    def rotated_keys(self, end: int | None = None) -> torch.Tensor:
        """The first `end` (default: the valid length) cached keys k~ = A k: (B, Hkv, end, D)."""
        return torch.cat(self.key_parts(end), dim=-1)

    def decode_step(
        self, query_rot, end: int, k_top: int, scale: float, group_select: bool, settings=None
    ) -> torch.Tensor:
        """Loki attention of one rotated query row (B, Hq, D) over the view [0, end), rows past each
        row's valid length never selected -> (B, Hq, D). `settings`: the kernels' KernelSettings."""
        extra = {} if settings is None else {"settings": settings}
        return kernels.loki_decode(
            query_rot,
            self.k_low[:, :, :end],
            self.k_rest[:, :, :end],
            self.values[:, :, :end],
            k_top,
            scale=scale,
            group_select=group_select,
            seqlens=self.seqlens,
            **extra,
        )

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.k_low, self.k_rest, self.values


class _StaticCache(Cache):
    """Cache-wide settings of the static caches: capacity and the attention's view length."""

    def __init__(self, layers: list[_StaticLayer]):
        super().__init__(layers=layers)
        self.view_length: int | None = None  # None: attend over the exact valid length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    @torch.compiler.disable
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """`Cache.update`, opaque to torch.compile: it keeps host-side lengths."""
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set_length(self, length: int) -> None:
        """Declare the first `length` tokens of every layer valid (after graph replays, or to rewind)."""
        for layer in self.layers:
            layer.set_length(length)

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity


class StaticKVCache(_StaticCache):
    """Dense keys and values of `num_layers` layers, each preallocated to `capacity` tokens."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__([StaticKVLayer(capacity) for _ in range(num_layers)])


class StaticLokiCache(BudgetedCache, _StaticCache):
    """A StaticLokiLayer per model layer, plus the decode budget.

    basis: (layers, kv_heads, D, D) key transform A (PCA directions as rows for the paper's basis)
    dims:  d per layer (layers,), one split width for all KV heads of a layer
    k:     fraction of the cached tokens attended at each decode step, in (0, 1] ...
    budget: ... or tokens attended at each step (exactly one of k and budget)
    group_select: under GQA, one token set per KV head (summed group scores) instead of per query head
    capacity: tokens each layer holds (prompt plus generated tokens)
    query_basis: (layers, kv_heads, D, D) query transform B, or None for B = A (orthonormal A);
        the query-aware basis passes B = A^-T
    """

    layer_class = StaticLokiLayer

    def __init__(
        self,
        basis: torch.Tensor,
        dims: list[int] | torch.Tensor,
        k: float | None = None,
        capacity: int = 0,
        group_select: bool = False,
        query_basis: torch.Tensor | None = None,
        budget: int | None = None,
    ):
        self._set_budget(k, budget, group_select)
        super().__init__(
            [
                self.layer_class(key_basis, d, capacity, queries)
                for key_basis, d, queries in per_layer(basis, dims, query_basis)
            ]
        )
