"""Adaptive Loki: per query row, score tokens on the r basis coordinates that matter most to it.

Fixed-d Loki scores every query on the same first d coordinates of the calibrated basis. Here each
query row picks its own r (= the method's d) coordinates: the r largest |q~_j|·sigma_j, where q~ is
the query in the basis (the query transform) and sigma_j the spread of key coordinate j, so the
pick estimates which terms q~_j·k~_j move the scores most. Then the exact top k, as Loki.

sigma (`LayerInputs.key_scale`) is the square root of the calibration eigenvalue of coordinate j:
of the key covariance for the key basis, and of S_q^½ C_k S_q^½ for the query-aware basis, which is
exactly the variance of k~_j = (A k)_j there (A C_k Aᵀ = diag(eigenvalues)). It is the centered
spread: the key mean adds the same constant to every score of a row and never changes a selection.
Without a key_scale, sigma = 1: the pick is the r largest |q~_j|.

Under GQA the group always shares one coordinate set, the r largest sums over its query heads of
|q~_j|·sigma_j, so a KV head reads r·S low-rank values, never G·r·S: the decode kernel
(`keyspace.kernels.adaptive_decode`) streams those r coordinates once per KV head. Each query head
keeps its own top k, or with group_select the group keeps one token set (summed scores).
Coordinates are chosen among the first d_max of the basis (None: all of them).
"""

from __future__ import annotations

import torch

from keyspace.loki.methods.base import Method, Style, loki_cost, register_method
from keyspace.loki.methods.common import (
    LayerInputs,
    group_sum,
    keep_top,
    masked,
    rotate,
    top_coordinates,
)


def coordinate_weights(inp: LayerInputs, query_t: torch.Tensor) -> torch.Tensor:
    """|q~_j|·sigma_j per row (B, Hq, T, D), summed over each KV head's query heads (one coordinate
    set per group, as the kernel reads), and -inf beyond d_max so those are never picked."""
    weight = query_t.abs().float()
    if inp.group_size > 1:
        batch, heads, rows, dim = weight.shape
        grouped = weight.view(batch, heads // inp.group_size, inp.group_size, rows, dim).sum(2)
        weight = grouped.repeat_interleave(inp.group_size, dim=1)
    if inp.key_scale is not None:  # sigma is per KV head: the same for every head of a group
        weight = weight * inp.key_scale.float().to(weight.device)[None, :, None, :]
    if inp.d_max is not None:
        weight[..., inp.d_max :] = float("-inf")
    return weight


def rotated_query(inp: LayerInputs) -> torch.Tensor:
    """q~ = B q (B: the query transform, or the key transform of an orthonormal basis): (B, Hq, T, D)."""
    if inp.basis is None or inp.dims is None:
        raise ValueError("loki-adaptive needs a basis and d")
    if inp.d_max is not None and int(inp.dims.max()) > inp.d_max:
        raise ValueError(f"r={int(inp.dims.max())} exceeds d_max={inp.d_max}")
    return rotate(inp.query, inp.basis if inp.query_basis is None else inp.query_basis)


def chosen_coordinates(inp: LayerInputs, query_t: torch.Tensor | None = None) -> torch.Tensor:
    """The coordinates each query row scores on: a 0/1 mask (B, Hq, T, D) with dims[h] ones."""
    query_t = rotated_query(inp) if query_t is None else query_t
    return top_coordinates(coordinate_weights(inp, query_t), inp.dims).to(query_t.dtype)


def adaptive_scores(inp: LayerInputs) -> torch.Tensor:
    """q~·k~ over each row's chosen coordinates: (B, Hq, T, S)."""
    query_t = rotated_query(inp)
    picked = chosen_coordinates(inp, query_t)  # [B, Hq, T, D]
    return (query_t * picked) @ rotate(inp.key, inp.basis).transpose(-1, -2)


def loki_adaptive(inp: LayerInputs) -> torch.Tensor:
    scores = adaptive_scores(inp)
    if inp.group_select:
        scores = group_sum(scores, inp.group_size)
    return masked(inp.exact_scores, keep_top(scores, inp.budget, inp.causal))


LOKI_ADAPTIVE = register_method(
    Method(
        "loki-adaptive",
        loki_adaptive,
        cost=loki_cost,  # r·S low-rank values + 2·k·S·D, as Loki at d = r
        decode="cache",  # Loki(select="adaptive"): LokiCache and the static cache
        style=Style("#ff9896", "h", "adaptive Loki"),
        uses_d=True,
        uses_k=True,
        uses_basis=True,
        uses_group=True,
        uses_key_scale=True,
        in_default_grid=False,
    )
)
