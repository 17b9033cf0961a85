"""What the dynamic (`LokiCache`) and static (`StaticLokiCache`) decode stacks share, once:

- `Budget`: the tokens a decode step keeps, a fraction k of the context or a fixed token budget;
- `TransformedKeys`: a layer's key transform A, query transform B and split width d, their checks,
  the float32 cast, and the rotations k~ = A k (split at d) and q~ = B q;
- `per_layer`: a whole cache's (A, d, B) per layer, once its arguments check;
- `causal_attention`: the exact prefill (and dense) attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from keyspace.loki.masked import causal_mask, fraction_of
from keyspace.loki.methods.common import rotate


@dataclass(frozen=True)
class Budget:
    """Tokens kept per index set at a decode step: ceil(k · length) for a fraction k in (0, 1], or
    a fixed `tokens` budget (as RULER-style evaluations, Quest and ShadowKV quote); exactly one.
    Either way at least 1 and at most the length."""

    k: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.k is None) == (self.tokens is None):
            raise ValueError("give exactly one of k (a fraction) or budget (tokens per step)")
        if self.k is not None and not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {self.k}")
        if self.tokens is not None and (isinstance(self.tokens, bool) or int(self.tokens) < 1):
            raise ValueError(f"budget must be a positive number of tokens, got {self.tokens}")

    def kept(self, length: int) -> int:
        """Tokens kept out of `length`: in [1, length] (length >= 1)."""
        wanted = int(fraction_of(self.k, length)) if self.tokens is None else int(self.tokens)
        return max(1, min(wanted, length))


def check_query_basis(basis: torch.Tensor, query_basis: torch.Tensor | None) -> None:
    """The query transform is None (the key transform serves both) or has the key transform's shape."""
    if query_basis is not None and query_basis.shape != basis.shape:
        raise ValueError(
            f"query_basis {tuple(query_basis.shape)} must have the basis' shape {tuple(basis.shape)}"
        )


def per_layer(
    basis: torch.Tensor, dims, query_basis: torch.Tensor | None
) -> list[tuple[torch.Tensor, int, torch.Tensor | None]]:
    """(key transform (Hkv, D, D), d, query transform or None) per layer of basis (layers, Hkv, D, D)."""
    if basis.dim() != 4 or basis.shape[-1] != basis.shape[-2]:
        raise ValueError(f"basis must be (layers, kv_heads, D, D), got {tuple(basis.shape)}")
    dims = [int(d) for d in dims]
    if len(dims) != basis.shape[0]:
        raise ValueError(f"need one d per layer ({basis.shape[0]}), got {len(dims)}")
    check_query_basis(basis, query_basis)
    queries = [None] * len(dims) if query_basis is None else query_basis
    return [(basis[i], d, queries[i]) for i, d in enumerate(dims)]


class TransformedKeys:
    """A cache layer's basis: key transform A and query transform B (Hkv, D, D), rows as output
    coordinates (B None: B = A, the orthonormal PCA basis), and the split width d of the keys."""

    def _set_basis(self, basis: torch.Tensor, d: int, query_basis: torch.Tensor | None) -> None:
        check_query_basis(basis, query_basis)
        if not 1 <= d <= basis.shape[-1]:
            raise ValueError(f"d must be in [1, {basis.shape[-1]}], got {d}")
        self.basis, self.d = basis, int(d)
        self.query_basis = basis if query_basis is None else query_basis
        self.per_query_head = None  # (Hq, D, D): B repeated to the query heads, on first use

    def _cast_basis(self, device: torch.device) -> None:
        # float32 whatever the model dtype: `rotate` computes in float32 (exactness of q~·k~).
        self.basis = self.basis.to(device, torch.float32)
        self.query_basis = self.query_basis.to(device, torch.float32)
        self.per_query_head = None

    def rotate_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys (B, Hkv, T, D) -> k~ = A k, (B, Hkv, T, D) in the keys' dtype."""
        return rotate(keys, self.basis)

    def split_keys(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys (B, Hkv, T, D) -> k~ = A k split at d: (B, Hkv, T, d), (B, Hkv, T, D - d)."""
        rotated = self.rotate_keys(keys)  # [B, Hkv, T, D]
        return rotated[..., : self.d], rotated[..., self.d :]

    def rotated_query(self, query: torch.Tensor) -> torch.Tensor:
        """q~ = B q: query (B, Hq, T, D) through its KV head's query transform -> (B, Hq, T, D)."""
        if self.per_query_head is None or self.per_query_head.shape[0] != query.shape[1]:
            groups = query.shape[1] // self.query_basis.shape[0]
            self.per_query_head = self.query_basis.repeat_interleave(groups, dim=0)  # [Hq, D, D]
        return rotate(query, self.per_query_head)


class BudgetedCache:
    """The cache-wide decode settings of a Loki cache: its `Budget` and GQA group selection."""

    def _set_budget(self, k: float | None, budget: int | None, group_select: bool) -> None:
        self.budget_rule, self.group_select = Budget(k, budget), bool(group_select)

    def set_budget(self, k: float | None = None, budget: int | None = None) -> None:
        """Change the budget of a filled cache (a sweep over k on one prefill)."""
        self.budget_rule = Budget(k, budget)

    @property
    def k(self) -> float | None:
        return self.budget_rule.k

    @property
    def budget(self) -> int | None:
        return self.budget_rule.tokens

    def tokens_kept(self, length: int) -> int:
        return self.budget_rule.kept(length)


def causal_attention(query, keys, values, scale: float) -> torch.Tensor:
    """Exact causal attention, the queries being the last T of the S keys: query (B, Hq, T, D),
    keys/values (B, Hkv, S, D) -> (B, T, Hq, D).

    K and V are repeated to the query heads (a transient (B, Hq, S, D) copy): with SDPA's
    `enable_gqa` instead, 25 task prompts of 8192 tokens ran out of memory on an H200 (torch 2.11,
    float32), where this form had decoded 50 at once. A whole sequence (T == S) uses `is_causal`;
    otherwise an explicit mask (none for one row), since a lower-right causal bias with GQA can
    fall back to materializing the whole score matrix.
    """
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    groups = query.shape[1] // keys.shape[1]
    mask = None if q_len in (kv_len, 1) else causal_mask(q_len, kv_len, query.device)
    out = F.scaled_dot_product_attention(
        query,
        keys.repeat_interleave(groups, dim=1),
        values.repeat_interleave(groups, dim=1),
        attn_mask=mask,
        is_causal=q_len == kv_len and q_len > 1,
        scale=scale,
    )
    return out.transpose(1, 2).contiguous()
