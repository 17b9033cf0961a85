"""Selection methods for masked mode: which keys each query row attends to, at one token budget.

Every method is a function `(LayerInputs) -> logits (batch, q_heads, q_len, kv_len)`, with `-inf`
outside the tokens it keeps. The caller turns logits into exact attention: softmax, then values.
Top-k methods keep exactly `budget[i]` tokens of row i's causal context; `pcaattn` keeps all of
it but scores in d dimensions; `full` is dense causal attention.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

NUM_SINKS = 4  # StreamingLLM's attention sinks


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
    dims:   (q_heads,) long or None; d for each query head
    group_select: Loki sums the low-rank scores of a KV head's query heads and keeps one token set
        for the whole group (each selected row is read once), instead of one set per query head
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

    def __post_init__(self) -> None:
        q_len, kv_len = self.query.shape[-2], self.key.shape[-2]
        if self.causal.shape != (q_len, kv_len) or self.budget.shape != (q_len,):
            raise ValueError("causal must be (q_len, kv_len) and budget (q_len,)")
        if self.query.shape[:2] != self.key.shape[:2]:
            raise ValueError("repeat keys to query heads before building LayerInputs")

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


def full(inp: LayerInputs) -> torch.Tensor:
    return masked(inp.exact_scores, inp.causal)


def exact_topk(inp: LayerInputs) -> torch.Tensor:
    keep = keep_top(inp.exact_scores, inp.budget, inp.causal)
    return masked(inp.exact_scores, keep)


def group_sum(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum the scores of each KV head's query heads: (B, Hq, T, S) -> (B, Hq, T, S), equal within a group."""
    batch, heads, rows, cols = scores.shape
    summed = scores.view(batch, heads // group_size, group_size, rows, cols).sum(dim=2)
    return summed.repeat_interleave(group_size, dim=1)


def loki(inp: LayerInputs) -> torch.Tensor:
    scores = inp.pca_scores
    if inp.group_select:
        scores = group_sum(scores, inp.group_size)
    keep = keep_top(scores, inp.budget, inp.causal)
    return masked(inp.exact_scores, keep)


def pcaattn(inp: LayerInputs) -> torch.Tensor:
    """Attention computed from the d-dimensional scores alone, over the whole causal context."""
    return masked(inp.pca_scores, inp.causal)


def sparq_scores(query: torch.Tensor, key: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """SparQ's approximate scores: each query row's dims[h] largest-|q| coordinates against the
    same coordinates of every key. query (B, H, T, D), key (B, H, S, D) -> (B, H, T, S)."""
    r_max = int(dims.max())
    index = query.abs().topk(r_max, dim=-1).indices  # [B, H, T, r_max]
    rank_ok = torch.arange(r_max, device=index.device)[None, :] < dims.to(index.device)[:, None]
    picked = torch.zeros_like(query).scatter_(
        -1, index, rank_ok[None, :, None, :].expand_as(index).to(query.dtype)
    )
    return (query * picked) @ key.transpose(-1, -2)


def sparq(inp: LayerInputs) -> torch.Tensor:
    """SparQ step 1+2: approximate scores from the r = d largest-|q| coordinates, then top-k."""
    if inp.dims is None:
        raise ValueError("sparq needs d")
    keep = keep_top(sparq_scores(inp.query, inp.key, inp.dims), inp.budget, inp.causal)
    return masked(inp.exact_scores, keep)


def h2o(inp: LayerInputs) -> torch.Tensor:
    """Heavy hitters + recent, half each; heavy = accumulated attention of all earlier queries.

    Masked-mode H2O: the accumulated score of key j at row i is the sum over rows i' <= i of the
    dense softmax weight p[i', j], the oracle form of H2O's running sum.
    """
    probs = torch.softmax(full(inp).float() * inp.scale, dim=-1)
    accumulated = probs.cumsum(dim=-2)  # [B, H, T, S]
    recent = inp.budget - inp.budget // 2
    positions = torch.arange(inp.causal.shape[1], device=probs.device)
    last = inp.causal.sum(dim=-1) - 1  # [T], index of the row's own token
    is_recent = (positions[None, :] > (last - recent)[:, None]) & inp.causal
    return masked(
        inp.exact_scores,
        keep_top(accumulated.masked_fill(is_recent, float("inf")), inp.budget, inp.causal),
    )


def streaming(inp: LayerInputs) -> torch.Tensor:
    """StreamingLLM: the first NUM_SINKS tokens plus the most recent ones."""
    kv_len = inp.causal.shape[1]
    recency = torch.arange(kv_len, device=inp.query.device, dtype=torch.float32)
    recency = torch.where(recency < NUM_SINKS, recency + 2 * kv_len, recency)
    keep = keep_top(recency.expand(inp.causal.shape), inp.budget, inp.causal)
    return masked(inp.exact_scores, keep[None, None].expand(inp.exact_scores.shape))


@dataclass(frozen=True)
class Method:
    """A selection method and what it consumes: `d` (dimensions), `k` (budget), a PCA basis."""

    name: str
    select: Callable[[LayerInputs], torch.Tensor]
    uses_d: bool
    uses_k: bool
    uses_basis: bool


def kv_bytes_fraction(method: str, d: float | None, k: float | None, head_dim: int) -> float:
    """Share of a dense decode step's KV bytes (2·S·D) that `method` reads: Loki reads S·d + 2·k·S·D."""
    full_dim, d, k = float(head_dim), float(d or 0.0), float(k or 1.0)
    reads = {
        "full": 2 * full_dim,
        "loki": d + 2 * k * full_dim,
        "sparq": d + 2 * k * full_dim,
        "exact-topk": full_dim + k * full_dim,
        "pcaattn": d + full_dim,
        "h2o": 2 * k * full_dim,
        "streaming": 2 * k * full_dim,
    }
    return reads[method] / (2 * full_dim)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("loki", loki, uses_d=True, uses_k=True, uses_basis=True),
        Method("full", full, uses_d=False, uses_k=False, uses_basis=False),
        Method("exact-topk", exact_topk, uses_d=False, uses_k=True, uses_basis=False),
        Method("h2o", h2o, uses_d=False, uses_k=True, uses_basis=False),
        Method("pcaattn", pcaattn, uses_d=True, uses_k=False, uses_basis=True),
        Method("sparq", sparq, uses_d=True, uses_k=True, uses_basis=False),
        Method("streaming", streaming, uses_d=False, uses_k=True, uses_basis=False),
    )
}
