"""Low-rank scores: `q[:, :, :d] · k_lowᵀ` for every cached token, in fp32.

One program owns a tile of `scores_block_s` tokens of one (batch, KV head) and scores it for all G
query heads of that KV head at once, so each KV head's `k_low` is read exactly once (GQA included).
With `group_select` the G scores are summed and one row per KV head is written: as (Σ_h q_h)·k, a
GEMV, which is also the path for G = 1; per-head rows under GQA use a tensor-core dot.

Bytes moved: reads B·Hkv·S·d·es of `k_low` (es = element size) plus the queries; writes
B·Hsel·S·4 bytes of fp32 scores (Hsel = Hkv with group_select, else Hq). Positions at or past
`seqlens[b]` are written as -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keyspace.kernels._checks import check_cache, check_seqlens, selected_heads, use_triton
from keyspace.kernels.settings import DEFAULT_SETTINGS, KernelSettings

TILE_MAJOR_MAX_ROWS = 65535  # CUDA's limit on a grid's second dimension


@triton.jit
def _lowrank_scores_kernel(
    q_ptr,  # (B, Hq, D) strided; the first D_LOW columns are read
    k_low_ptr,  # (B, Hkv, S, D_LOW): rows of D_LOW contiguous values, any batch / head strides
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    out_ptr,  # (B, Hsel, S) fp32 contiguous
    counter_ptr,  # (B * Hsel,) int32 to zero when ZERO_COUNTERS (the attention's split counters)
    S,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    Q_HEADS,
    KV_HEADS,
    D_LOW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_ROW: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVICT: tl.constexpr,
    TILE_MAJOR: tl.constexpr,  # grid (tiles, B·Hkv) instead of (B·Hkv, tiles)
    ZERO_COUNTERS: tl.constexpr,
):
    GROUP = Q_HEADS // KV_HEADS
    if TILE_MAJOR:
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(0)
    else:
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
    b = pid_bh // KV_HEADS
    h_kv = pid_bh % KV_HEADS
    if ZERO_COUNTERS:
        # The decode step's attention counts finished splits per index set; zeroing them here,
        # two launches ahead, saves a memset in the step. Index sets of this (b, KV head): one
        # (one row per KV head) or its G query heads.
        if pid_s == 0:
            sets = 1 if ONE_ROW else GROUP
            offs_c = tl.arange(0, BLOCK_H)
            zeros = tl.zeros([BLOCK_H], tl.int32)
            tl.store(counter_ptr + pid_bh * sets + offs_c, zeros, mask=offs_c < sets)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    h_mask = offs_h < GROUP
    d_mask = offs_d < D_LOW

    # q_low: [BLOCK_H, BLOCK_D], the G query heads of this KV head (rows past G are zero).
    q_rows = q_ptr + b * stride_qb + (h_kv * GROUP + offs_h)[:, None] * stride_qh
    q_low = tl.load(q_rows + offs_d[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    # k_tile: [BLOCK_S, BLOCK_D], contiguous rows of k_low.
    k_base = k_low_ptr + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    k_tile = tl.load(
        k_base + offs_s[:, None] * D_LOW + offs_d[None, :],
        mask=(offs_s[:, None] < S) & d_mask[None, :],
        other=0.0,
        eviction_policy=EVICT,
    )
    length = S
    if HAS_SEQLENS:
        length = tl.minimum(tl.load(seqlens_ptr + b).to(tl.int32), S)
    valid = offs_s < length

    if ONE_ROW:
        # One row per KV head (the group's sum, or G = 1): the G scores sum to (Σ_h q_h)·k, one
        # multiply-add per element of k_low in fp32 instead of a tensor-core dot over G query rows
        # padded to 16.
        q_sum = tl.sum(q_low.to(tl.float32), axis=0)  # [BLOCK_D]
        row = tl.sum(k_tile.to(tl.float32) * q_sum[None, :], axis=1)  # [BLOCK_S]
        row = tl.where(valid, row, float("-inf"))
        tl.store(out_ptr + pid_bh.to(tl.int64) * S + offs_s, row, mask=offs_s < S)
    else:
        # [BLOCK_H, BLOCK_S]: each of the G query heads against the tile
        scores = tl.dot(q_low, tl.trans(k_tile), input_precision=DOT_PRECISION)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        rows = (b * Q_HEADS + h_kv * GROUP + offs_h).to(tl.int64) * S
        tl.store(
            out_ptr + rows[:, None] + offs_s[None, :],
            scores,
            mask=h_mask[:, None] & (offs_s[None, :] < S),
        )


def rows_contiguous(k_low: torch.Tensor) -> bool:
    """Whether each (batch, KV head) slice of k_low is one contiguous (S, d) block, as in a slice
    `buffer[:, :, :S]` of a preallocated cache; its batch and head strides may be anything."""
    seq, d = k_low.shape[-2:]
    return (d == 1 or k_low.stride(-1) == 1) and (seq == 1 or k_low.stride(-2) == d)


def rows_contiguous_view(k_low: torch.Tensor) -> torch.Tensor:
    """k_low itself when `rows_contiguous`, else a contiguous copy."""
    return k_low if rows_contiguous(k_low) else k_low.contiguous()


def score_tile(block_d: int, elem_size: int, one_row: bool, settings: KernelSettings) -> int:
    """Tokens per program: `scores_block_s`, fewer where the dot path's tile in shared memory
    would pass `scores_dot_tile_bytes` (d = 256 in fp32 must fit the H100's 227 KB)."""
    block_s = settings.scores_block_s
    if one_row:
        return block_s  # the GEMV keeps its tile in registers
    return max(16, min(block_s, settings.scores_dot_tile_bytes // (block_d * elem_size)))


def _lowrank_scores_triton(
    q: torch.Tensor,
    k_low: torch.Tensor,
    group_select: bool,
    seqlens: torch.Tensor | None,
    counters: torch.Tensor | None = None,
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Launch the score kernel. q (B, Hq, >=d) with unit last stride; k_low (B, Hkv, S, d).

    counters: optional (B·Hsel,) int32 that the kernel sets to zero (the decode step's split
    counters for the attention, which would otherwise need a memset).
    """
    assert q.dtype == k_low.dtype and q.stride(-1) == 1
    assert rows_contiguous(k_low)
    batch, q_heads, _ = q.shape
    _, kv_heads, seq, d = k_low.shape
    assert q_heads % kv_heads == 0 and q.shape[2] >= d
    out_heads = selected_heads(q_heads, kv_heads, group_select)
    out = torch.empty((batch, out_heads, seq), device=q.device, dtype=torch.float32)
    assert counters is None or (counters.numel() == batch * out_heads and counters.is_contiguous())
    group = q_heads // kv_heads
    # Tiles fastest in the grid where its second dimension (at most 65535) can hold B·Hkv.
    tile_major = settings.scores_tile_major and batch * kv_heads <= TILE_MAJOR_MAX_ROWS
    one_row = group_select or group == 1
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    block_s = score_tile(block_d, k_low.element_size(), one_row, settings)
    tiles = triton.cdiv(seq, block_s)
    grid = (tiles, batch * kv_heads) if tile_major else (batch * kv_heads, tiles)
    _lowrank_scores_kernel[grid](
        q,
        k_low,
        seqlens if seqlens is not None else out,
        out,
        counters if counters is not None else out,
        seq,
        q.stride(0),
        q.stride(1),
        k_low.stride(0),
        k_low.stride(1),
        q_heads,
        kv_heads,
        D_LOW=d,
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        BLOCK_S=block_s,
        ONE_ROW=one_row,
        HAS_SEQLENS=seqlens is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        EVICT="evict_first" if settings.scores_evict_first else "",
        TILE_MAJOR=tile_major,
        ZERO_COUNTERS=counters is not None,
        num_warps=settings.scores_num_warps,
    )
    return out


def lowrank_scores(
    q: torch.Tensor,
    k_low: torch.Tensor,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Score every cached token with the first d PCA components.

    Args:
        q: (batch, q_heads, head_dim) or (batch, q_heads, d); only the first d columns are read.
        k_low: (batch, kv_heads, seq, d), the first d PCA components of the keys.
        group_select: sum the scores of each KV head's query heads into one row.
        seqlens: (batch,) valid length per sequence; positions past it score -inf.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        settings: the Triton launch parameters (`KernelSettings`).

    Returns:
        (batch, kv_heads if group_select else q_heads, seq) float32 scores.
    """
    batch, _, _, seq, d, _ = check_cache(q, k_low, None, None)
    check_seqlens(seqlens, batch, seq, q.device)
    if not use_triton(backend, q, k_low):
        return lowrank_scores_reference(q, k_low, group_select, seqlens)
    if q.stride(-1) != 1:
        q = q.contiguous()
    k_low = rows_contiguous_view(k_low)
    return _lowrank_scores_triton(q, k_low, group_select, seqlens, settings=settings)


def lowrank_scores_reference(
    q: torch.Tensor,
    k_low: torch.Tensor,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch fp32 version of `lowrank_scores`, same arguments and result."""
    batch, q_heads, _ = q.shape
    _, kv_heads, seq, d = k_low.shape
    group = q_heads // kv_heads
    q_low = q[..., :d].float().reshape(batch, kv_heads, group, d)  # [B, Hkv, G, d]
    scores = torch.einsum("bhgd,bhsd->bhgs", q_low, k_low.float())  # [B, Hkv, G, S]
    if group_select:
        scores = scores.sum(dim=2)  # [B, Hkv, S]
    else:
        scores = scores.reshape(batch, q_heads, seq)
    if seqlens is not None:
        past_end = torch.arange(seq, device=q.device)[None, :] >= seqlens[:, None]  # [B, S]
        scores = scores.masked_fill(past_end[:, None, :], float("-inf"))
    return scores
