"""Low-rank scores with the exact top-k selection folded into the same launch.

Used by the decode step when each KV head has one index set (MHA, or GQA with group_select) and
the row is short enough (S <= FUSED_MAX) for one score program to select it from registers.

The grid is (tile, row) with the tile varying fastest, so rows finish one after another. Each
program scores BLOCK_S tokens of one (batch, KV head) row with one query vector (the query head
under MHA; the sum of the group's G query heads under group_select, since sum_g q_g·k =
(sum_g q_g)·k) and writes them to an fp32 row (-inf at or past `seqlens[b]`). It then bumps the
row's counter; the program that completes the row selects its exact top k by register bisection
(`select._bisect_row`) while the score streams of later rows keep the memory busy. This saves
the select's launch and overlaps all but the last rows' selections with the score pass.

Bytes moved: B·Hkv·S·d·es of `k_low`, B·Hkv·S·4 written to the score rows and read back from L2
(twice), B·Hkv·k·4 of indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keyspace.kernels.select import CHUNK, _bisect_row, _row_bounds

FUSED_MAX = 8192  # longest row one score program selects (32 scores a thread at 8 warps)
BLOCK_S = 256  # tokens per program: 256 × d=32 fp16 = 16 KB


@triton.jit
def _score_select_kernel(
    q_ptr,  # (B, Hq, D) with unit last stride; the first D_LOW columns are read
    k_low_ptr,  # (B, Hkv, S, D_LOW) contiguous
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    scores_ptr,  # (B, Hkv, S) fp32 out
    idx_ptr,  # (B, Hkv, K_TOP) int32 out
    counter_ptr,  # (B * Hkv,) int32, zero on entry: tiles of each row done
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
    HAS_SEQLENS: tl.constexpr,
    ROW: tl.constexpr,
    CHUNK: tl.constexpr,
):
    tile = tl.program_id(0)
    row = tl.program_id(1)  # b * KV_HEADS + h_kv
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

    pos = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    valid = pos < length
    k_tile = tl.load(
        k_low_ptr + row.to(tl.int64) * S * D_LOW + pos[:, None] * D_LOW + offs_d[None, :],
        mask=valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    score = tl.sum(k_tile.to(tl.float32) * q_sum[None, :], 1)
    out_row = scores_ptr + row.to(tl.int64) * S
    tl.store(out_row + pos, tl.where(valid, score, float("-inf")), mask=pos < S)

    # Every thread's stores happen before the release below; the row's last program acquires.
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
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
    assert q_heads % kv_heads == 0 and q.shape[2] >= d and 1 <= k_top <= seq <= FUSED_MAX
    scores = torch.empty((batch, kv_heads, seq), device=q.device, dtype=torch.float32)
    idx = torch.empty((batch, kv_heads, k_top), device=q.device, dtype=torch.int32)
    counter = torch.zeros((batch * kv_heads,), device=q.device, dtype=torch.int32)
    row = triton.next_power_of_2(seq)
    _score_select_kernel[(triton.cdiv(seq, BLOCK_S), batch * kv_heads)](
        q,
        k_low,
        seqlens if seqlens is not None else idx,
        scores,
        idx,
        counter,
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
        HAS_SEQLENS=seqlens is not None,
        ROW=row,
        CHUNK=min(CHUNK, row),
        num_warps=max(4, row // 1024),  # the selecting program holds 32 scores a thread
    )
    return scores, idx
