"""One adaptive Loki decode step: choose r coordinates per (batch, KV head) from the query, score
every cached token with them, keep the exact top-k, attend exactly over the kept rows.

Stages: the coordinate choice (`adaptive_coords`, a few small torch ops on the queries, or,
with `KernelSettings.adaptive_choice = "kernel"`, inside the score kernel), the adaptive score
pass (adaptive.py), the select (select.py), the split-K attention (attention.py) over the full
rotated keys, passed to it as k_low = keys (d = D) with an empty k_rest. The coordinate-major
store `k_low_t (B, Hkv, d_max, S)` is an extra copy of the first d_max coordinates, read only for
scoring.

Bytes moved per step (es = element size, k = k_top, Hsel = Hkv with group_select, else Hq):
    chosen coordinate streams:  B·Hkv·r·S·es   (+ the queries and the coordinates)
    scores, write + passes:     B·Hsel·S·4·(1 + passes)   (passes mostly from L2)
    selected rows:              B·Hsel·k·2·D·es
against 2·B·Hkv·S·D·es for dense attention.
"""

from __future__ import annotations

import contextlib
import math

import torch

from keyspace.kernels._checks import (
    check_cache,
    check_k_top,
    selected_heads,
    unit_last_stride,
    use_triton,
)
from keyspace.kernels.adaptive import (
    _adaptive_fused_triton,
    _adaptive_scores_triton,
    adaptive_coords,
    adaptive_scores_reference,
    check_adaptive,
)
from keyspace.kernels.attention import _sparse_attention_triton, sparse_attention_reference
from keyspace.kernels.decode import _pipelined, _side_stream
from keyspace.kernels.select import _select_topk_triton, select_topk_reference
from keyspace.kernels.settings import DEFAULT_SETTINGS, KernelSettings


def _no_rest(keys: torch.Tensor) -> torch.Tensor:
    """An empty (B, Hkv, S, 0) view: the attention then reads all D dims from `keys`."""
    return keys[..., keys.shape[-1] :]


def _scores(q, k_low_t, coords, group_select, seqlens, settings):
    """Adaptive score pass that also zeroes the attention's split counters. `coords` is either
    the chosen (B, Hkv, r) int32 coordinates, or (r, sigma) for the kernel to choose them."""
    sets = q.shape[0] * selected_heads(q.shape[1], k_low_t.shape[1], group_select)
    counters = torch.empty((sets,), device=q.device, dtype=torch.int32)
    if isinstance(coords, tuple):
        r, sigma = coords
        scores = _adaptive_fused_triton(
            q, k_low_t, r, sigma, group_select, seqlens, counters, settings
        )
    else:
        scores = _adaptive_scores_triton(
            q, k_low_t, coords, group_select, seqlens, counters, settings
        )
    return scores, counters  # [B, Hsel, S] fp32, (B·Hsel,) int32


def _attend(q, keys, v, scores, k_top, scale, seqlens, counters, out, settings):
    idx = _select_topk_triton(scores, k_top, seqlens, settings)  # [B, Hsel, k] int32
    return _sparse_attention_triton(
        q, keys, _no_rest(keys), v, idx, scale, None, counters, out, settings
    )  # [B, Hq, D]


def _stages(q, k_low_t, keys, v, coords, k_top, scale, group_select, seqlens, out, settings):
    scores, counters = _scores(q, k_low_t, coords, group_select, seqlens, settings)
    return _attend(q, keys, v, scores, k_top, scale, seqlens, counters, out, settings)


def _pipelined_step(q, k_low_t, keys, v, coords, k_top, scale, group_select, seqlens, settings):
    """Two half-batches, the second on a side stream, as decode.py's `_loki_decode_pipelined`:
    one half's latency-bound select overlaps the other's memory-bound passes."""
    batch = q.shape[0]
    halves = (slice(0, batch // 2), slice(batch // 2, batch))
    lens = [None, None] if seqlens is None else [seqlens[h] for h in halves]
    out = torch.empty_like(q)
    main = torch.cuda.current_stream(q.device) if q.is_cuda else None
    side = _side_stream(q.device) if q.is_cuda else None

    def half(h):
        return coords if isinstance(coords, tuple) else coords[h]

    first, second = ((q[h], k_low_t[h], keys[h], v[h], half(h)) for h in halves)
    scores, counters = _scores(first[0], first[1], first[4], group_select, lens[0], settings)
    if side is not None:
        side.wait_stream(main)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        _stages(*second, k_top, scale, group_select, lens[1], out[halves[1]], settings)
    _attend(first[0], first[2], first[3], scores, k_top, scale, lens[0], counters,
            out[halves[0]], settings)  # fmt: skip
    if side is not None:
        main.wait_stream(side)
    return out


def _check(q, k_low_t, keys, v, r, k_top, seqlens):
    """All the step's argument checks; returns head_dim."""
    batch, _, kv_heads, seq, _, head_dim = check_cache(q, keys, _no_rest(keys), v)
    if k_low_t.dim() != 4 or (k_low_t.shape[0], k_low_t.shape[1], k_low_t.shape[3]) != (
        batch, kv_heads, seq
    ):  # fmt: skip
        raise ValueError(
            f"k_low_t must be ({batch}, {kv_heads}, d_max, {seq}), got {tuple(k_low_t.shape)}"
        )
    d_max = k_low_t.shape[2]
    check_adaptive(q, k_low_t, None, seqlens)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d_max:
        raise ValueError(f"r must be an int in [1, d_max={d_max}], got {r!r}")
    check_k_top(k_top, seq)
    return head_dim


def adaptive_decode(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    keys: torch.Tensor,
    v: torch.Tensor,
    r: int,
    k_top: int,
    sigma: torch.Tensor | None = None,
    scale: float | None = None,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Adaptive Loki sparse attention for one decode step.

    Args:
        q: (batch, q_heads, head_dim), the query already rotated into the basis.
        k_low_t: (batch, kv_heads, d_max, seq), the first d_max rotated key coordinates,
            coordinate-major (a contiguous last dim; other strides free).
        keys: (batch, kv_heads, seq, head_dim), the full rotated keys (contiguous last dim).
        v: (batch, kv_heads, seq, head_dim), the values (contiguous last dim).
        r: coordinates scored per (batch, KV head), in [1, d_max].
        k_top: tokens kept per query head (per KV group with group_select), in [1, seq].
        sigma: (kv_heads, d_max) key scale per coordinate, or None (all 1): the coordinates are
            the r largest of Σ_{h in group} |q_h,j|·σ_j.
        scale: softmax scale, default 1/sqrt(head_dim).
        group_select: under GQA, sum each group's scores and keep one index set per KV head.
        seqlens: (batch,) valid length per sequence, each in [1, seq]; None means all seq.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        settings: the Triton launch parameters (`KernelSettings`).

    Returns:
        (batch, q_heads, head_dim) in q's dtype. At k_top = seq this is dense attention.
    """
    head_dim = _check(q, k_low_t, keys, v, r, k_top, seqlens)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not use_triton(backend, q, k_low_t, keys, v):
        return adaptive_decode_reference(
            q, k_low_t, keys, v, r, k_top, sigma, scale, group_select, seqlens
        )
    if settings.adaptive_choice == "kernel":  # the score kernel ranks the coordinates itself
        d_max = k_low_t.shape[2]
        if sigma is not None:
            if tuple(sigma.shape) != (keys.shape[1], d_max):
                raise ValueError(
                    f"sigma must be ({keys.shape[1]}, {d_max}), got {tuple(sigma.shape)}"
                )
            sigma = sigma.to(device=q.device, dtype=torch.float32).contiguous()
        coords = (r, sigma)
    else:
        coords = adaptive_coords(q, r, keys.shape[1], k_low_t.shape[2], sigma)  # [B, Hkv, r]
    q = q.contiguous()
    k_low_t, keys, v = (unit_last_stride(t) for t in (k_low_t, keys, v))
    args = (q, k_low_t, keys, v, coords, k_top, scale, group_select, seqlens)
    if _pipelined(q, keys, group_select, settings):
        return _pipelined_step(*args, settings)
    return _stages(*args, None, settings)


def adaptive_decode_reference(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    keys: torch.Tensor,
    v: torch.Tensor,
    r: int,
    k_top: int,
    sigma: torch.Tensor | None = None,
    scale: float | None = None,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch fp32 adaptive decode step with the signature of `adaptive_decode`."""
    _check(q, k_low_t, keys, v, r, k_top, seqlens)
    coords = adaptive_coords(q, r, keys.shape[1], k_low_t.shape[2], sigma)
    scores = adaptive_scores_reference(q, k_low_t, coords, group_select, seqlens)  # [B, Hsel, S]
    idx = select_topk_reference(scores, k_top, seqlens)  # [B, Hsel, k]
    return sparse_attention_reference(q, keys, _no_rest(keys), v, idx, scale)
