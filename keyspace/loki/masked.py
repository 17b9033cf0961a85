"""Masked mode: whole windows in one forward, every query row attending only to its selected keys.

with masked_attention(model, SparseSettings("loki", k=0.125, dims=dims, basis=basis)):
    logits = model(input_ids, use_cache=False).logits
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from keyspace.loki.registry import use_attention
from keyspace.loki.selection import METHODS, LayerInputs

K_MODES = ("window", "row")


@dataclass
class SparseSettings:
    """One method at one budget.

    k:      fraction of context kept, in (0, 1]; ignored by methods that keep everything
    k_mode: "window" (every row keeps ceil(k·T), all of a shorter context) or "row" (ceil(k·(i+1)))
    dims:   (layers, kv_heads) long, d per KV head; needed by loki, pcaattn, sparq
    basis:  (layers, kv_heads, head_dim, head_dim), the key transform A (k~ = A k); rows = PCA
        directions for the paper's basis; needed by loki, pcaattn
    group_select: loki keeps one token set per KV head (summed group scores), not per query head
    dense_rows: rows at positions < dense_rows keep their whole context (a dense prefill); the rows
        after it are decode steps at the budget. 0: every row is sparse
    query_basis: (layers, kv_heads, head_dim, head_dim), the query transform B (q~ = B q), or None
        for B = A (an orthonormal basis). The query-aware basis has B = A^-T, so q~·k~ = q·k
    """

    method: str
    k: float = 1.0
    k_mode: str = "window"
    dims: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    group_select: bool = False
    dense_rows: int = 0
    query_basis: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {self.k}")
        if self.k_mode not in K_MODES:
            raise ValueError(f"k_mode must be one of {K_MODES}, got {self.k_mode!r}")
        if self.dense_rows < 0:
            raise ValueError(f"dense_rows must be >= 0, got {self.dense_rows}")
        spec = METHODS[self.method]
        if spec.uses_d and self.dims is None:
            raise ValueError(f"{self.method} needs dims")
        if spec.uses_basis and self.basis is None:
            raise ValueError(f"{self.method} needs a basis")
        if (
            self.dims is not None
            and self.basis is not None
            and self.dims.shape != self.basis.shape[:2]
        ):
            raise ValueError("dims must be (layers, kv_heads) like the basis")
        if self.query_basis is not None and (
            self.basis is None or self.query_basis.shape != self.basis.shape
        ):
            raise ValueError("query_basis needs a basis of the same shape")


def fraction_of(k: float, n: torch.Tensor | int) -> torch.Tensor:
    """ceil(k·n), at least 1; rounding first so that 0.1·30 is 3, not 4."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return torch.ceil(torch.round(k * n, decimals=6)).clamp(min=1).long()


def row_budgets(
    k: float, k_mode: str, q_len: int, kv_len: int, dense_rows: int = 0
) -> torch.Tensor:
    """Tokens kept by each query row: (q_len,) long. Row i sees kv_len - q_len + i + 1 keys.

    Rows at positions < dense_rows keep all of them.
    """
    context = torch.arange(kv_len - q_len + 1, kv_len + 1)
    if k_mode == "window":
        budget = torch.minimum(fraction_of(k, kv_len).expand_as(context), context)
    else:
        budget = torch.minimum(fraction_of(k, context), context)
    return torch.where(context <= dense_rows, context, budget)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, kv_len) bool: the queries are the last q_len positions of the keys."""
    rows = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] <= rows[:, None]


def layer_inputs(settings: SparseSettings, layer: int, query, key, scale: float) -> LayerInputs:
    """query (B, Hq, T, D), key (B, Hkv, S, D) -> LayerInputs with keys repeated to query heads."""
    groups = query.shape[1] // key.shape[1]
    q_len, kv_len = query.shape[-2], key.shape[-2]

    def per_query_head(t):
        return None if t is None else t[layer].repeat_interleave(groups, dim=0).to(query.device)

    return LayerInputs(
        query=query,
        key=key.repeat_interleave(groups, dim=1),
        scale=scale,
        causal=causal_mask(q_len, kv_len, query.device),
        budget=row_budgets(settings.k, settings.k_mode, q_len, kv_len, settings.dense_rows).to(
            query.device
        ),
        basis=per_query_head(settings.basis),
        dims=per_query_head(settings.dims),
        query_basis=per_query_head(settings.query_basis),
        group_size=groups,
        group_select=settings.group_select,
    )


def attend(logits: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact attention from masked logits (B, Hq, T, S) and values (B, Hkv, S, D) -> (B, T, Hq, D)."""
    groups = logits.shape[1] // value.shape[1]
    probs = torch.softmax(logits.float() * scale, dim=-1).to(value.dtype)
    return (probs @ value.repeat_interleave(groups, dim=1)).transpose(1, 2).contiguous()


def masked_handler(settings: SparseSettings):
    select = METHODS[settings.method].select

    def handler(module, query, key, value, scale):
        inputs = layer_inputs(settings, module.layer_idx, query, key, scale)
        return attend(select(inputs), value, scale)

    return handler


@contextlib.contextmanager
def masked_attention(model: torch.nn.Module, settings: SparseSettings) -> Iterator[torch.nn.Module]:
    """Run `model` with masked-mode sparse attention; the model is restored on exit."""
    with use_attention(model, masked_handler(settings)):
        yield model
