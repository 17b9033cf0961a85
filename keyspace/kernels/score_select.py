"""Low-rank scores and exact top-k in one launch: one program per selection row.

Used by the decode step when each KV head has one index set (MHA, or GQA with group_select) and
the row fits the register bisection (S <= select.BISECT_MAX). A program owns one (batch, KV head):

1. It streams that head's `k_low` once, tile by tile (software-pipelined), and scores every token
   with one query vector: the query head itself under MHA, or the sum of the group's G query heads
   under group_select (sum_g q_g·k = (sum_g q_g)·k). Scores go to an fp32 row in global memory,
   which stays in L2; positions at or past `seqlens[b]` score -inf.
2. After a block barrier it selects the exact top k of its own row by register bisection
   (`select._bisect_row`).

Against the separate score and select launches this saves a launch and the select's wait for the
whole score grid, and the select of one row overlaps the score streams of the rows still running.
With B·Hkv programs (128 at B=16, Hkv=8) each SM streams about one row.

Bytes moved: B·Hkv·S·d·es of `k_low`, B·Hkv·S·4 written to the score rows and read back about
twice from L2, B·Hkv·k·4 of indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keyspace.kernels.select import CHUNK, _bisect_row, _row_bounds, bisect_warps

BLOCK_S = 256  # tokens per tile: 256 × d=32 fp16 = 16 KB
NUM_STAGES = 3  # tiles in flight per program
MIN_WARPS = 4


@triton.jit
def _score_select_kernel(
    q_ptr,  # (B, Hq, D) with unit last stride; the first D_LOW columns are read
    k_low_ptr,  # (B, Hkv, S, D_LOW) contiguous
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    scores_ptr,  # (B, Hkv, S) fp32 out
    idx_ptr,  # (B, Hkv, K_TOP) int32 out
    S,
    K_TOP,
    stride_qb,
    stride_qh,
    Q_HEADS,
    KV_HEADS,
    D_LOW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    ROW: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)  # b * KV_HEADS + h_kv
    b = row // KV_HEADS
    h_kv = row % KV_HEADS
    group = Q_HEADS // KV_HEADS
    length, k = _row_bounds(seqlens_ptr, row, S, K_TOP, KV_HEADS, HAS_SEQLENS)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D_LOW
    q_rows = q_ptr + b * stride_qb + (h_kv * group + offs_g)[:, None] * stride_qh
    q = tl.load(
        q_rows + offs_d[None, :], mask=(offs_g < group)[:, None] & d_mask[None, :], other=0.0
    )
    q_sum = tl.sum(q.to(tl.float32), 0)  # [BLOCK_D]: one query vector for the whole group

    k_base = k_low_ptr + row.to(tl.int64) * S * D_LOW
    out_row = scores_ptr + row.to(tl.int64) * S
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in tl.range(0, S, BLOCK_S, num_stages=NUM_STAGES):
        pos = s0 + offs_s
        valid = pos < length
        tile = tl.load(
            k_base + pos[:, None] * D_LOW + offs_d[None, :],
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_S, BLOCK_D]
        score = tl.sum(tile.to(tl.float32) * q_sum[None, :], 1)
        tl.store(out_row + pos, tl.where(valid, score, float("-inf")), mask=pos < S)
    tl.debug_barrier()  # the row's scores, written by every thread, are read back below
    _bisect_row(out_row, idx_ptr + row.to(tl.int64) * K_TOP, length, k, K_TOP, ROW, CHUNK)


def _score_select_triton(
    q: torch.Tensor, k_low: torch.Tensor, k_top: int, seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, Hkv, S) fp32 and top-k indices (B, Hkv, k) int32, one index set per KV head.

    Under MHA these are the per-head scores; under GQA the group's summed scores.
    """
    assert q.dtype == k_low.dtype and q.stride(-1) == 1 and k_low.is_contiguous()
    batch, q_heads, _ = q.shape
    _, kv_heads, seq, d = k_low.shape
    assert q_heads % kv_heads == 0 and q.shape[2] >= d and 1 <= k_top <= seq
    scores = torch.empty((batch, kv_heads, seq), device=q.device, dtype=torch.float32)
    idx = torch.empty((batch, kv_heads, k_top), device=q.device, dtype=torch.int32)
    row = triton.next_power_of_2(seq)
    _score_select_kernel[(batch * kv_heads,)](
        q,
        k_low,
        seqlens if seqlens is not None else idx,
        scores,
        idx,
        seq,
        k_top,
        q.stride(0),
        q.stride(1),
        q_heads,
        kv_heads,
        D_LOW=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_G=triton.next_power_of_2(q_heads // kv_heads),
        BLOCK_S=BLOCK_S,
        NUM_STAGES=NUM_STAGES,
        HAS_SEQLENS=seqlens is not None,
        ROW=row,
        CHUNK=min(CHUNK, row),
        num_warps=max(MIN_WARPS, bisect_warps(seq)),
    )
    return scores, idx
