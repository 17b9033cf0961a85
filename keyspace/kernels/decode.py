"""One Loki decode step: low-rank scores, exact top-k, exact attention over the kept rows.

Three stages, three launches (scores, select, split-K attention whose last split per index set
merges the partials); see `scores.py`, `select.py` and `attention.py` for each kernel and its
bytes.

Bytes moved per step (es = element size, k = k_top, Hsel = Hkv with group_select, else Hq):
    k_low once:              B·Hkv·S·d·es
    scores, write + passes:  B·Hsel·S·4·(1 + passes)   (passes mostly from L2)
    selected rows:           B·Hsel·k·2·D·es, or B·Hq·k·((2D - d)·es + 4) per head when the
                             attention reuses the scores' q_low·k_low
against 2·B·Hkv·S·D·es for dense attention.
"""

from __future__ import annotations

import contextlib
import math

import torch

from keyspace.kernels._checks import (
    check_cache,
    check_k_top,
    check_seqlens,
    selected_heads,
    unit_last_stride,
    use_triton,
)
from keyspace.kernels.attention import _sparse_attention_triton, sparse_attention_reference
from keyspace.kernels.scores import (
    _lowrank_scores_triton,
    lowrank_scores_reference,
    rows_contiguous_view,
)
from keyspace.kernels.select import _select_topk_triton, select_topk_reference
from keyspace.kernels.settings import DEFAULT_SETTINGS, KernelSettings

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _split_counters(q, k_low, group_select):
    """The attention's per-index-set split counters, uninitialised: the score pass zeroes them."""
    sets = q.shape[0] * selected_heads(q.shape[1], k_low.shape[1], group_select)
    return torch.empty((sets,), device=q.device, dtype=torch.int32)


def _scores(q, k_low, group_select, seqlens, settings):
    """Score pass that also zeroes the attention's split counters: (scores, counters)."""
    counters = _split_counters(q, k_low, group_select)
    scores = _lowrank_scores_triton(q, k_low, group_select, seqlens, counters, settings)
    return scores, counters


def _attend(q, k_low, k_rest, v, scores, idx, scale, counters, out, settings):
    # One query head per index set: its scores already hold q_low·k_low for every token.
    per_head = scores.shape[1] == q.shape[1]
    low = scores if settings.reuse_low_scores and per_head else None
    return _sparse_attention_triton(
        q, k_low, k_rest, v, idx, scale, low, counters, out, settings
    )  # [B, Hq, D]


def _loki_decode_stages(q, k_low, k_rest, v, k_top, scale, group_select, seqlens, out, settings):
    """The Triton stages back to back on the current stream (into `out` if given)."""
    scores, counters = _scores(q, k_low, group_select, seqlens, settings)  # [B, Hsel, S] fp32
    idx = _select_topk_triton(scores, k_top, seqlens, settings)  # [B, Hsel, k] int32
    return _attend(q, k_low, k_rest, v, scores, idx, scale, counters, out, settings)


def _pipelined(q, k_low, group_select: bool, settings: KernelSettings) -> bool:
    """Whether the step runs as two half-batches (see `_loki_decode_pipelined`)."""
    batch = q.shape[0]
    sets = batch * selected_heads(q.shape[1], k_low.shape[1], group_select)
    if settings.pipeline == "never" or batch < 2 or sets < settings.pipeline_min_sets:
        return False
    # Eager steps are bound by the host's launch time: twice the launches cost more than the
    # overlap saves, so by default only a captured CUDA graph pipelines.
    return settings.pipeline == "always" or (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _loki_decode_pipelined(q, k_low, k_rest, v, k_top, scale, group_select, seqlens, settings):
    """The batch cut in two halves; the second runs on a side stream that starts once the first
    half's scores are queued, so the selection of one half (latency-bound, light on memory)
    overlaps the memory-bound score or attention pass of the other. Off CUDA the halves run in
    turn on the current stream, through the same split."""
    batch = q.shape[0]
    first, second = slice(0, batch // 2), slice(batch // 2, batch)
    lens = [None, None] if seqlens is None else [seqlens[first], seqlens[second]]
    out = torch.empty_like(q)  # each half's attention writes its rows: no concatenation
    main = torch.cuda.current_stream(q.device) if q.is_cuda else None
    side = _side_stream(q.device) if q.is_cuda else None
    scores, counters = _scores(q[first], k_low[first], group_select, lens[0], settings)
    if side is not None:
        side.wait_stream(main)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        _loki_decode_stages(
            q[second], k_low[second], k_rest[second], v[second], k_top, scale, group_select,
            lens[1], out[second], settings,
        )  # fmt: skip
    idx = _select_topk_triton(scores, k_top, lens[0], settings)
    cache = (q[first], k_low[first], k_rest[first], v[first])
    _attend(*cache, scores, idx, scale, counters, out[first], settings)
    if side is not None:
        main.wait_stream(side)
    return out


def _loki_decode_triton(
    q: torch.Tensor,
    k_low: torch.Tensor,
    k_rest: torch.Tensor,
    v: torch.Tensor,
    k_top: int,
    scale: float,
    group_select: bool,
    seqlens: torch.Tensor | None,
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """The Triton stages; no host synchronisation, so a CUDA graph can capture the step.

    With `settings.pipeline` "capture" (while a CUDA graph is being captured) or "always", a
    batch of at least 2 with at least `pipeline_min_sets` index sets runs as two half-batches.
    """
    args = (q, k_low, k_rest, v, k_top, scale, group_select, seqlens)
    if _pipelined(q, k_low, group_select, settings):
        return _loki_decode_pipelined(*args, settings)
    return _loki_decode_stages(*args, None, settings)


def loki_decode(
    q: torch.Tensor,
    k_low: torch.Tensor,
    k_rest: torch.Tensor,
    v: torch.Tensor,
    k_top: int,
    scale: float | None = None,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Loki sparse attention for one decode step.

    Args:
        q: (batch, q_heads, head_dim), the query already rotated into the PCA basis.
        k_low: (batch, kv_heads, seq, d), the first d PCA components of the cached keys.
        k_rest: (batch, kv_heads, seq, head_dim - d), the remaining components (width 0 at d=D).
        v: (batch, kv_heads, seq, head_dim), the values. `k_rest` and `v` may be strided views
            (e.g. `keys[..., d:]`) with a contiguous last dim: they are read in place, not copied.
            `k_low` is read in place when each head's (seq, d) block is contiguous, such as
            `buffer[:, :, :seq]` of a preallocated cache; otherwise it is copied first.
        k_top: tokens kept per query head (per KV group with group_select), in [1, seq].
        scale: softmax scale, default 1/sqrt(head_dim).
        group_select: under GQA, sum each group's low-rank scores and select one index set per
            KV head, so each selected row is read once for the group.
        seqlens: (batch,) valid length per sequence, each in [1, seq]; None means all seq.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        settings: the Triton launch parameters (`KernelSettings`); the default is tuned.

    Returns:
        (batch, q_heads, head_dim) in q's dtype. At k_top = seq this is dense attention.
    """
    batch, _, _, seq, _, head_dim = check_cache(q, k_low, k_rest, v)
    check_k_top(k_top, seq)
    check_seqlens(seqlens, batch, seq, q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not use_triton(backend, q, k_low, k_rest, v):
        return loki_decode_reference(q, k_low, k_rest, v, k_top, scale, group_select, seqlens)
    q, k_low = q.contiguous(), rows_contiguous_view(k_low)  # each head's (S, d) block streamed
    k_rest, v = unit_last_stride(k_rest), unit_last_stride(v)  # gathered rows: views are fine
    return _loki_decode_triton(q, k_low, k_rest, v, k_top, scale, group_select, seqlens, settings)


def loki_decode_reference(
    q: torch.Tensor,
    k_low: torch.Tensor,
    k_rest: torch.Tensor,
    v: torch.Tensor,
    k_top: int,
    scale: float | None = None,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch fp32 Loki decode step with the signature of `loki_decode`."""
    batch, _, _, seq, _, head_dim = check_cache(q, k_low, k_rest, v)
    check_k_top(k_top, seq)
    check_seqlens(seqlens, batch, seq, q.device)
    scores = lowrank_scores_reference(q, k_low, group_select, seqlens)  # [B, Hsel, S]
    idx = select_topk_reference(scores, k_top, seqlens)  # [B, Hsel, k]
    return sparse_attention_reference(q, k_low, k_rest, v, idx, scale)


def dense_attention_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 dense decode attention, the oracle for k_top = S.

    q (batch, q_heads, D), keys and v (batch, kv_heads, seq, D) -> (batch, q_heads, D) fp32.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, seq = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    keys = keys.float().repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    values = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", q.float(), keys) * scale  # [B, Hq, S]
    if seqlens is not None:
        past_end = torch.arange(seq, device=q.device)[None, :] >= seqlens[:, None]
        logits = logits.masked_fill(past_end[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(logits, dim=-1), values)
