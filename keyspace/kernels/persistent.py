"""The whole decode step in one launch: persistent programs pulling work from a queue.

Used (PERSISTENT in decode.py) when each KV head has one index set (MHA, or GQA with
group_select) and the row fits the register bisection (S <= PERSISTENT_MAX). It runs the same
three stages as the separate launches, with the same helpers (`lowrank_scores._score_tile`,
`select._bisect_row`, `sparse_attention._attend_split`), but as work items of one grid:

    [score tiles, row-major] [one select per row] [attention splits, row-major]

A program takes the next item from an atomic queue counter until none is left. A select waits
(spinning on an acquire load) until its row's tiles are all scored; an attention split waits until
its row is selected; the last split of a row merges the partials. So the select of a row starts
as soon as that row is scored, while later rows are still streaming, and the attention of a row
starts while later rows are still being selected: no stage waits for a whole grid to drain, and
there is one launch instead of three.

Every wait is on an item taken from the queue earlier, by a program that is running and never
waits on a later item, so the step cannot deadlock whatever the number of resident programs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from keyspace.kernels.lowrank_scores import BLOCK_S, _score_tile
from keyspace.kernels.select import CHUNK, _bisect_row, _row_bounds
from keyspace.kernels.sparse_attention import BLOCK_N, LOG2E, _attend_split

PERSISTENT_MAX = 8192  # longest row: 64 scores a thread in registers at 4 warps
PROGRAMS_PER_SM = 3
NUM_WARPS = 4
SPLITS_PER_ROW_MIN = 1


@triton.jit
def _wait_at_least(ptr, target):
    seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _loki_step_kernel(
    q_ptr,  # (B, Hq, D) contiguous
    k_low_ptr,  # (B, Hkv, S, D_LOW) contiguous
    k_rest_ptr,  # (B, Hkv, S, D - D_LOW) contiguous
    v_ptr,  # (B, Hkv, S, D) contiguous
    seqlens_ptr,  # (B,) int, or a dummy
    scores_ptr,  # (B * Hkv, S) fp32 scratch
    idx_ptr,  # (B * Hkv, K_TOP) int32 scratch
    part_acc_ptr,  # (B, Hq, SPLITS, D) fp32 scratch
    part_ml_ptr,  # (B, Hq, SPLITS, 2) fp32 scratch
    out_ptr,  # (B, Hq, D) out
    sync_ptr,  # (1 + 3 * ROWS,) int32 zero on entry: queue, tiles done, row ready, splits done
    S,
    K_TOP,
    ROWS,
    N_TILES,
    SPLITS,
    rows_per_split,
    qk_scale,
    Q_HEADS,
    KV_HEADS,
    D: tl.constexpr,
    D_LOW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROW: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DL: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOW_SCORES: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    queue = sync_ptr
    tiles_done = sync_ptr + 1
    ready = sync_ptr + 1 + ROWS
    splits_done = sync_ptr + 1 + 2 * ROWS
    score_end = ROWS * N_TILES
    select_end = score_end + ROWS
    total = select_end + ROWS * SPLITS
    item = tl.atomic_add(queue, 1, sem="relaxed", scope="gpu")
    while item < total:
        if item < score_end:
            row = item // N_TILES
            _score_tile(
                q_ptr, k_low_ptr, seqlens_ptr, scores_ptr, S, Q_HEADS * D, D, Q_HEADS, KV_HEADS,
                row, item % N_TILES, D_LOW, BLOCK_D, BLOCK_HS, BLOCK_S, True, HAS_SEQLENS,
                DOT_PRECISION,
            )  # fmt: skip
            tl.debug_barrier()  # every thread's scores before the release
            tl.atomic_add(tiles_done + row, 1, sem="release", scope="gpu")
        elif item < select_end:
            row = item - score_end
            _wait_at_least(tiles_done + row, N_TILES)
            length, k = _row_bounds(seqlens_ptr, row, S, K_TOP, KV_HEADS, HAS_SEQLENS)
            row_ptr = scores_ptr + row.to(tl.int64) * S
            out_row = idx_ptr + row.to(tl.int64) * K_TOP
            _bisect_row(row_ptr, row_ptr, out_row, length, k, K_TOP, ROW, CHUNK, False)
            tl.debug_barrier()  # every thread's indices before the release
            tl.atomic_add(ready + row, 1, sem="release", scope="gpu")
        else:
            row = (item - select_end) // SPLITS
            _wait_at_least(ready + row, 1)
            _attend_split(
                q_ptr, k_low_ptr, k_rest_ptr, v_ptr, idx_ptr, scores_ptr, part_acc_ptr,
                part_ml_ptr, out_ptr, splits_done, S, K_TOP, rows_per_split, qk_scale, Q_HEADS,
                KV_HEADS, KV_HEADS, SPLITS, row, (item - select_end) % SPLITS, D, D_LOW,
                BLOCK_H, BLOCK_DL, BLOCK_DR, BLOCK_DV, BLOCK_N, DOT_PRECISION, LOW_SCORES, True,
                BLOCK_SPLITS,
            )  # fmt: skip
        item = tl.atomic_add(queue, 1, sem="relaxed", scope="gpu")


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _loki_decode_persistent(
    q: torch.Tensor,
    k_low: torch.Tensor,
    k_rest: torch.Tensor,
    v: torch.Tensor,
    k_top: int,
    scale: float,
    seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """One index set per KV head (MHA, or GQA summing each group's scores); S <= PERSISTENT_MAX.

    All tensors contiguous. Returns (B, Hq, D) in q's dtype.
    """
    batch, q_heads, head_dim = q.shape
    _, kv_heads, seq, d = k_low.shape
    assert seq <= PERSISTENT_MAX and 1 <= k_top <= seq
    for t in (q, k_low, k_rest, v):
        assert t.is_contiguous() and t.dtype == q.dtype
    rows, group = batch * kv_heads, q_heads // kv_heads
    device = q.device
    on_cuda = device.type == "cuda"
    programs = PROGRAMS_PER_SM * _sm_count(device) if on_cuda else 2
    # Split-K so that the attention items alone fill the programs about once.
    splits = max(SPLITS_PER_ROW_MIN, triton.cdiv(programs, rows)) if on_cuda else 1
    splits = min(splits, triton.cdiv(k_top, BLOCK_N))
    rows_per_split = triton.cdiv(triton.cdiv(k_top, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(k_top, rows_per_split)
    n_tiles = triton.cdiv(seq, BLOCK_S)
    scores = torch.empty((rows, seq), device=device, dtype=torch.float32)
    idx = torch.empty((rows, k_top), device=device, dtype=torch.int32)
    part_acc = torch.empty((batch, q_heads, splits, head_dim), device=device, dtype=torch.float32)
    part_ml = torch.empty((batch, q_heads, splits, 2), device=device, dtype=torch.float32)
    out = torch.empty_like(q)
    sync = torch.zeros((1 + 3 * rows,), device=device, dtype=torch.int32)
    row = triton.next_power_of_2(seq)
    _loki_step_kernel[(programs,)](
        q, k_low, k_rest, v, seqlens if seqlens is not None else sync, scores, idx, part_acc,
        part_ml, out, sync, seq, k_top, rows, n_tiles, splits, rows_per_split, scale * LOG2E,
        q_heads, kv_heads, D=head_dim, D_LOW=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_HS=max(16, triton.next_power_of_2(group)),
        BLOCK_S=BLOCK_S, HAS_SEQLENS=seqlens is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROW=row, CHUNK=min(CHUNK, row),
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_DL=max(16, triton.next_power_of_2(d)),
        BLOCK_DR=max(16, triton.next_power_of_2(max(head_dim - d, 1))),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=BLOCK_N, LOW_SCORES=group == 1, BLOCK_SPLITS=triton.next_power_of_2(splits),
        num_warps=NUM_WARPS, num_stages=2,
    )  # fmt: skip
    return out
