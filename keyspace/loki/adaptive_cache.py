"""Adaptive Loki's caches: the layout that lets each decode step score on r coordinates of its own.

Per layer, for batch B, KV heads Hkv, cached length S, head_dim D and d_max stored coordinates:
  keys     (B, Hkv, S, D)      every rotated coordinate k~ = A k, row-major: the exact attention
                               over the kept rows reads them
  k_low_t  (B, Hkv, d_max, S)  the first d_max coordinates again, coordinate-major: one
                               coordinate's S values are contiguous, so r chosen coordinates are
                               r contiguous streams for the score pass
  values   (B, Hkv, S, D)      never transformed
At q_len == 1 the step is `keyspace.kernels.adaptive_decode` (Triton on CUDA, its reference
elsewhere, as `loki_decode` for fixed d): per (batch, KV head) the r coordinates with the largest
Σ_group |q~_j|·σ_j, scores over them, the exact top k, exact attention. Prefill stays dense.

`AdaptiveLokiCache` is a `LokiCache` (dynamic; `loki_decoding` runs it) and
`StaticAdaptiveLokiCache` a `StaticLokiCache` (preallocated, each token written in place, so
`DecodeLoop` and its CUDA graphs run it unchanged). `keyspace.Loki(select="adaptive")` builds both.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

import keyspace.kernels as kernels
from keyspace.loki.cache import LokiCache, LokiLayer
from keyspace.loki.core import per_layer
from keyspace.loki.static_cache import StaticLokiCache, StaticLokiLayer, _StaticCache


class AdaptiveStore:
    """What both adaptive layers add to a Loki layer: r (the layer's `d`), d_max, σ, the step."""

    def _set_adaptive(self, d_max: int | None, sigma: torch.Tensor | None) -> None:
        dim = self.basis.shape[-1]
        d_max = dim if d_max is None else int(d_max)
        if not self.d <= d_max <= dim:
            raise ValueError(f"d_max must be in [r={self.d}, D={dim}], got {d_max}")
        if sigma is not None and tuple(sigma.shape) != (self.basis.shape[0], d_max):
            raise ValueError(
                f"sigma must be (kv_heads, d_max) = {(self.basis.shape[0], d_max)},"
                f" got {tuple(sigma.shape)}"
            )
        self.d_max, self.sigma = d_max, sigma

    def _cast_sigma(self, device: torch.device) -> None:
        if self.sigma is not None:
            self.sigma = self.sigma.to(device, torch.float32)

    def _adaptive_step(
        self, query_rot, keys, k_low_t, values, k_top, scale, group_select, seqlens, settings
    ) -> torch.Tensor:
        """One rotated query row (B, Hq, D) over keys/values (B, Hkv, S, D) and k_low_t
        (B, Hkv, d_max, S) -> (B, Hq, D). `settings`: the kernels' KernelSettings, or None."""
        extra = {} if settings is None else {"settings": settings}
        return kernels.adaptive_decode(
            query_rot,
            k_low_t,
            keys,
            values,
            self.d,
            k_top,
            sigma=self.sigma,
            scale=scale,
            group_select=group_select,
            seqlens=seqlens,
            **extra,
        )


class AdaptiveLokiLayer(AdaptiveStore, LokiLayer):
    """One layer's rotated keys, row-major and (first d_max coordinates) coordinate-major.

    basis:       (kv_heads, D, D) key transform A; query_basis (kv_heads, D, D) or None (B = A)
    r:           coordinates each step scores on, in [1, d_max]
    d_max:       coordinates stored coordinate-major (None: D)
    sigma:       (kv_heads, d_max) key scale per coordinate, or None (all 1)
    """

    token_axes = {"keys": -2, "k_low_t": -1, "values": -2}

    def __init__(self, basis, r: int, query_basis=None, d_max=None, sigma=None):
        super().__init__(basis, r, query_basis)
        self._set_adaptive(d_max, sigma)
        self.keys = self.k_low_t = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, 0, dim)
        self.k_low_t = key_states.new_zeros(batch, heads, self.d_max, 0)
        self.values = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
        self._cast_basis(key_states.device)
        self._cast_sigma(key_states.device)
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append post-RoPE keys (B, Hkv, T, D) rotated, in both layouts, and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rotated = self.rotate_keys(key_states)  # [B, Hkv, T, D]
        low_t = rotated[..., : self.d_max].transpose(-1, -2)  # [B, Hkv, d_max, T]
        self.keys = torch.cat([self.keys, rotated], dim=-2)
        self.k_low_t = torch.cat([self.k_low_t, low_t], dim=-1)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def rotated_keys(self) -> torch.Tensor:
        """All cached keys in the basis, k~ = A k: (B, Hkv, S, D)."""
        return self.keys

    def decode_step(self, query_rot, k_top: int, scale: float, group_select: bool):
        """Adaptive Loki attention of one rotated query row (B, Hq, D) -> (B, Hq, D)."""
        return self._adaptive_step(
            query_rot, self.keys, self.k_low_t, self.values, k_top, scale, group_select, None, None
        )


class StaticAdaptiveLokiLayer(AdaptiveStore, StaticLokiLayer):
    """`AdaptiveLokiLayer`'s layout preallocated to `capacity` tokens, each token written in place:
    keys (B, Hkv, capacity, D), k_low_t (B, Hkv, d_max, capacity), values (B, Hkv, capacity, D)."""

    def __init__(self, basis, r: int, capacity: int, query_basis=None, d_max=None, sigma=None):
        super().__init__(basis, r, capacity, query_basis)
        self._set_adaptive(d_max, sigma)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.capacity, dim)
        self.k_low_t = key_states.new_zeros(batch, heads, self.d_max, self.capacity)
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self._cast_basis(key_states.device)
        self._cast_sigma(key_states.device)
        self._init_lengths(batch, key_states.device)
        self.is_initialized = True

    def _write(self, positions, rotated, values) -> None:
        """Store rotated keys (B, Hkv, T, D) in both layouts, and values, at positions (T,)."""
        self.keys.index_copy_(2, positions, rotated)
        self.k_low_t.index_copy_(3, positions, rotated[..., : self.d_max].transpose(-1, -2))
        self.values.index_copy_(2, positions, values)

    def key_parts(self, end: int | None = None) -> tuple[torch.Tensor]:
        """The first `end` (default: the valid length) cached keys k~ = A k, one (B, Hkv, end, D)
        view."""
        return (self.keys[:, :, : self.length if end is None else end],)

    def rotated_keys(self, end: int | None = None) -> torch.Tensor:
        """The first `end` (default: the valid length) cached keys k~ = A k: (B, Hkv, end, D)."""
        return self.key_parts(end)[0]

    def decode_step(
        self, query_rot, end: int, k_top: int, scale: float, group_select: bool, settings=None
    ) -> torch.Tensor:
        """Adaptive attention of one rotated query row (B, Hq, D) over the view [0, end), rows past
        each row's valid length never selected -> (B, Hq, D)."""
        return self._adaptive_step(
            query_rot,
            self.keys[:, :, :end],
            self.k_low_t[..., :end],  # [B, Hkv, d_max, end], read in place
            self.values[:, :, :end],
            k_top,
            scale,
            group_select,
            self.seqlens,
            settings,
        )

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.k_low_t, self.values


def adaptive_layers(basis, dims, query_basis, d_max: int | None, key_scale) -> list[tuple]:
    """(A, r, B, d_max, σ) per layer: σ (kv_heads, d_max) sliced from key_scale
    (layers, kv_heads, D), or None."""
    if key_scale is not None and tuple(key_scale.shape) != tuple(basis.shape[:3]):
        raise ValueError(
            f"key_scale must be (layers, kv_heads, D) = {tuple(basis.shape[:3])},"
            f" got {tuple(key_scale.shape)}"
        )
    width = basis.shape[-1] if d_max is None else int(d_max)
    return [
        (a, r, b, width, None if key_scale is None else key_scale[i, :, :width])
        for i, (a, r, b) in enumerate(per_layer(basis, dims, query_basis))
    ]


class AdaptiveLokiCache(LokiCache):
    """An AdaptiveLokiLayer per model layer, plus the decode budget.

    basis, dims, k, group_select, query_basis, budget: as `LokiCache` (dims: r per layer)
    d_max:     coordinates stored coordinate-major per layer (None: head_dim), at least each r
    key_scale: (layers, kv_heads, D) σ per basis coordinate, or None (σ = 1)
    """

    def __init__(
        self,
        basis: torch.Tensor,
        dims: list[int] | torch.Tensor,
        k: float | None = None,
        group_select: bool = False,
        query_basis: torch.Tensor | None = None,
        budget: int | None = None,
        d_max: int | None = None,
        key_scale: torch.Tensor | None = None,
    ):
        self._set_budget(k, budget, group_select)
        layers = [
            AdaptiveLokiLayer(*layer)
            for layer in adaptive_layers(basis, dims, query_basis, d_max, key_scale)
        ]
        Cache.__init__(self, layers=layers)


class StaticAdaptiveLokiCache(StaticLokiCache):
    """A StaticAdaptiveLokiLayer per model layer: `StaticLokiCache`'s arguments plus d_max and
    key_scale, as `AdaptiveLokiCache`."""

    def __init__(
        self,
        basis: torch.Tensor,
        dims: list[int] | torch.Tensor,
        k: float | None = None,
        capacity: int = 0,
        group_select: bool = False,
        query_basis: torch.Tensor | None = None,
        budget: int | None = None,
        d_max: int | None = None,
        key_scale: torch.Tensor | None = None,
    ):
        self._set_budget(k, budget, group_select)
        layers = [
            StaticAdaptiveLokiLayer(a, r, capacity, b, width, sigma)
            for a, r, b, width, sigma in adaptive_layers(basis, dims, query_basis, d_max, key_scale)
        ]
        _StaticCache.__init__(self, layers)
