"""Masked mode: whole windows in one forward, every query row attending only to its selected keys.

with masked_attention(model, SparseSettings("loki", k=0.125, dims=dims, basis=basis)):
    logits = model(input_ids, use_cache=False).logits
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from keyspace.loki.methods import LayerInputs, get_method
from keyspace.loki.registry import use_attention

K_MODES = ("window", "row")


@dataclass
class SparseSettings:
    """One method at one budget.

    k:      fraction of context kept, in (0, 1]; ignored by methods that keep everything
    budget: tokens kept per row instead of a fraction (at least 1, capped by the row's context);
        give k or budget, not both (neither: k = 1, every row keeps its whole context)
    k_mode: "window" (every row keeps ceil(k·T), all of a shorter context) or "row" (ceil(k·(i+1)));
        a token budget is the same in both
    dims:   (layers, kv_heads) long, d per KV head (r for loki-adaptive); needed by methods using d
    basis:  (layers, kv_heads, head_dim, head_dim), the key transform A (k~ = A k); rows = PCA
        directions for the paper's basis; needed by loki, loki-adaptive, pcaattn
    group_select: loki keeps one token set per KV head (summed group scores), not per query head
        (loki-adaptive's coordinate choice is always one per KV head)
    dense_rows: rows at positions < dense_rows keep their whole context (a dense prefill); the rows
        after it are decode steps at the budget. 0: every row is sparse
    query_basis: (layers, kv_heads, head_dim, head_dim), the query transform B (q~ = B q), or None
        for B = A (an orthonormal basis). The query-aware basis has B = A^-T, so q~·k~ = q·k
    key_scale: (layers, kv_heads, head_dim) or None; sigma_j per basis coordinate (the sqrt of the
        calibration eigenvalue), read by loki-adaptive (None: sigma = 1)
    d_max:  loki-adaptive picks its coordinates among the first d_max of the basis (None: all)
    """

    method: str
    k: float | None = None
    k_mode: str = "window"
    dims: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    group_select: bool = False
    dense_rows: int = 0
    query_basis: torch.Tensor | None = None
    budget: int | None = None
    key_scale: torch.Tensor | None = None
    d_max: int | None = None

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        self._check_budget()
        if self.k_mode not in K_MODES:
            raise ValueError(f"k_mode must be one of {K_MODES}, got {self.k_mode!r}")
        if self.dense_rows < 0:
            raise ValueError(f"dense_rows must be >= 0, got {self.dense_rows}")
        if spec.uses_d and self.dims is None:
            raise ValueError(f"{self.method} needs dims")
        if spec.uses_basis and self.basis is None:
            raise ValueError(f"{self.method} needs a basis")
        self._check_shapes()

    def _check_budget(self) -> None:
        if self.k is not None and self.budget is not None:
            raise ValueError("give k (a fraction) or budget (tokens per row), not both")
        if self.budget is None and self.k is None:
            self.k = 1.0
        if self.k is not None and not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {self.k}")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1
        ):
            raise ValueError(f"budget must be a positive number of tokens, got {self.budget!r}")

    def _check_shapes(self) -> None:
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
        if self.key_scale is not None and (
            self.basis is None or self.key_scale.shape != self.basis.shape[:3]
        ):
            raise ValueError("key_scale must be (layers, kv_heads, head_dim) like the basis")
        if self.d_max is not None and self.dims is not None and int(self.dims.max()) > self.d_max:
            raise ValueError(f"d_max={self.d_max} is below the largest d ({int(self.dims.max())})")


def fraction_of(k: float, n: torch.Tensor | int) -> torch.Tensor:
    """ceil(k·n), at least 1; rounding first so that 0.1·30 is 3, not 4."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return torch.ceil(torch.round(k * n, decimals=6)).clamp(min=1).long()


def row_budgets(
    k: float | None,
    k_mode: str,
    q_len: int,
    kv_len: int,
    dense_rows: int = 0,
    budget: int | None = None,
) -> torch.Tensor:
    """Tokens kept by each query row: (q_len,) long. Row i sees kv_len - q_len + i + 1 keys.

    A fraction k (per window or per row, by k_mode), or a token `budget` per row (k None), capped
    by the row's context. Rows at positions < dense_rows keep all of them.
    """
    context = torch.arange(kv_len - q_len + 1, kv_len + 1)
    if (k is None) == (budget is None):
        raise ValueError("give k (a fraction) or budget (tokens per row), not both")
    if budget is not None:
        if budget < 1:
            raise ValueError(f"budget must be a positive number of tokens, got {budget}")
        wanted = torch.full_like(context, budget)
    elif k_mode == "window":
        wanted = fraction_of(k, kv_len).expand_as(context)
    else:
        wanted = fraction_of(k, context)
    return torch.where(context <= dense_rows, context, torch.minimum(wanted, context))


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
        budget=row_budgets(
            settings.k, settings.k_mode, q_len, kv_len, settings.dense_rows, settings.budget
        ).to(query.device),
        basis=per_query_head(settings.basis),
        dims=per_query_head(settings.dims),
        query_basis=per_query_head(settings.query_basis),
        group_size=groups,
        group_select=settings.group_select,
        key_scale=per_query_head(settings.key_scale),
        d_max=settings.d_max,
    )


def attend(logits: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact attention from masked logits (B, Hq, T, S) and values (B, Hkv, S, D) -> (B, T, Hq, D)."""
    groups = logits.shape[1] // value.shape[1]
    probs = torch.softmax(logits.float() * scale, dim=-1).to(value.dtype)
    return (probs @ value.repeat_interleave(groups, dim=1)).transpose(1, 2).contiguous()


def masked_handler(settings: SparseSettings):
    select = get_method(settings.method).select

    def handler(module, query, key, value, scale):
        inputs = layer_inputs(settings, module.layer_idx, query, key, scale)
        return attend(select(inputs), value, scale)

    return handler


@contextlib.contextmanager
def masked_attention(model: torch.nn.Module, settings: SparseSettings) -> Iterator[torch.nn.Module]:
    """Run `model` with masked-mode sparse attention; the model is restored on exit."""
    with use_attention(model, masked_handler(settings)):
        yield model
