"""What every selection method shares: its inputs (`LayerInputs`) and the helpers that score, keep
and mask tokens.

A method is a function `(LayerInputs) -> logits (batch, q_heads, q_len, kv_len)`, with `-inf`
outside the tokens it keeps. The caller turns logits into exact attention: softmax, then values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class LayerInputs:
    """One layer's attention inputs, with keys already repeated to query heads.

    query:  (batch, q_heads, q_len, head_dim), post-RoPE
    key:    (batch, q_heads, kv_len, head_dim), post-RoPE
    causal: (q_len, kv_len) bool, True where row i may see key j
    budget: (q_len,) long, tokens each row keeps (1 <= budget[i] <= context of row i)
    basis:  (q_heads, head_dim, head_dim) or None; the key transform of h's KV head (rows: PCA
        directions for the paper's basis), applied as k~ = basis[h] k
    query_basis: (q_heads, head_dim, head_dim) or None (None: `basis`); the query transform,
        q~ = query_basis[h] q, with query_basis = basis^-T so that q~·k~ = q·k
    dims:   (q_heads,) long or None; d for each query head (r for the per-query coordinate choices)
    group_select: Loki sums the low-rank scores of a KV head's query heads and keeps one token set
        for the whole group (each selected row is read once), instead of one set per query head
    key_scale: (q_heads, head_dim) or None; sigma_j, the spread of coordinate j of k~ in h's KV head
        (sqrt of the calibration eigenvalue), for methods that weigh a query's coordinates by it
    d_max:  None (all head_dim coordinates) or how many leading basis coordinates a per-query
        coordinate choice may pick from
    """

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    causal: torch.Tensor
    budget: torch.Tensor
    basis: torch.Tensor | None = None
    dims: torch.Tensor | None = None
    query_basis: torch.Tensor | None = None
    group_size: int = 1  # query heads per KV head; with group_select, Loki picks one set per group
    group_select: bool = False
    key_scale: torch.Tensor | None = None
    d_max: int | None = None

    def __post_init__(self) -> None:
        heads, q_len, head_dim = self.query.shape[1], self.query.shape[-2], self.query.shape[-1]
        if self.causal.shape != (q_len, self.key.shape[-2]) or self.budget.shape != (q_len,):
            raise ValueError("causal must be (q_len, kv_len) and budget (q_len,)")
        if self.query.shape[:2] != self.key.shape[:2]:
            raise ValueError("repeat keys to query heads before building LayerInputs")
        if self.key_scale is not None and self.key_scale.shape != (heads, head_dim):
            raise ValueError("key_scale must be (q_heads, head_dim)")
        if self.d_max is not None and not 1 <= self.d_max <= head_dim:
            raise ValueError(f"d_max must be in [1, head_dim={head_dim}], got {self.d_max}")

    @functools.cached_property
    def exact_scores(self) -> torch.Tensor:
        """q·k over all dimensions: (batch, q_heads, q_len, kv_len)."""
        return self.query @ self.key.transpose(-1, -2)

    @functools.cached_property
    def pca_scores(self) -> torch.Tensor:
        """q~·k~ over each head's first d basis coordinates (Loki's selection scores): (batch, q_heads, q_len, kv_len)."""
        if self.basis is None or self.dims is None:
            raise ValueError("this method needs a basis and d")
        return pca_scores(self.query, self.key, self.basis, self.dims, self.query_basis)


def rotate(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, seq, D) into basis (heads, D, D) with rows as directions -> (batch, heads, seq, D).

    x~ = basis[h] x, computed in float32 and returned in x's dtype: a query-aware transform and its
    inverse transpose are not orthonormal, and rounding them to fp16 first would break q~·k~ = q·k.
    """
    return torch.einsum("bhsd,hed->bhse", x.float(), basis.float()).to(x.dtype)


def first_dims_mask(dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(heads,) d per head -> (heads, head_dim) float mask with ones on the first d coordinates."""
    return (torch.arange(head_dim, device=dims.device)[None, :] < dims[:, None]).float()


def pca_scores(query, key, basis, dims, query_basis=None) -> torch.Tensor:
    """Loki's approximate scores q~[:d]·k~[:d], keys through `basis` and queries through
    `query_basis` (None: `basis`, the paper's orthonormal PCA basis); shapes as in `LayerInputs`."""
    query_basis = basis if query_basis is None else query_basis
    top = int(dims.max())  # only the first d_max directions are ever used
    mask = first_dims_mask(dims.to(query.device), top).to(query.dtype)
    q_low = rotate(query, query_basis[:, :top]) * mask[None, :, None, :]  # [B, Hq, T, d_max]
    return q_low @ rotate(key, basis[:, :top]).transpose(-1, -2)


def masked(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~allowed, float("-inf"))


def keep_top(scores: torch.Tensor, budget: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """Bool mask (batch, heads, q_len, kv_len) of the `budget[i]` highest causal scores in each row i."""
    top = int(budget.max())
    index = masked(scores, causal).topk(top, dim=-1).indices  # [B, H, T, top]
    take = (torch.arange(top, device=scores.device)[None, :] < budget[:, None]).expand_as(index)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, index, take) & causal


def group_sum(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum the scores of each KV head's query heads: (B, Hq, T, S) -> (B, Hq, T, S), equal within a group."""
    batch, heads, rows, cols = scores.shape
    summed = scores.view(batch, heads // group_size, group_size, rows, cols).sum(dim=2)
    return summed.repeat_interleave(group_size, dim=1)


def top_coordinates(weight: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask over coordinates, in weight's dtype: each row's dims[h] largest weights.

    weight (B, H, T, D) >= 0 (a coordinate never to be picked holds -inf), dims (H,) long
    -> (B, H, T, D).
    """
    r_max = int(dims.max())
    # Ties go to the lower coordinate (a stable sort), as in the adaptive decode kernel.
    index = weight.sort(dim=-1, descending=True, stable=True).indices[..., :r_max]  # [B,H,T,r]
    rank_ok = torch.arange(r_max, device=index.device)[None, :] < dims.to(index.device)[:, None]
    keep = rank_ok[None, :, None, :].expand_as(index).to(weight.dtype)
    return torch.zeros_like(weight).scatter_(-1, index, keep)
