"""Exact attention over selected cache rows, split-K over the index list (flash-decoding).

Stage 1: a program owns one index set (one query head, or one KV group with group_select) and one
chunk of its indices. It gathers the chosen rows of k_low [.., d], k_rest [.., D-d] and v [.., D],
scores them over all D dims for every query head that shares the set (tl.dot, fp32 accumulate),
and runs an online softmax. It writes an unnormalised partial (acc, max, sum) per query head.
Stage 2 merges the partials of each query head and normalises: by default inside the same launch,
in the last split of each index set to finish (an atomic counter per set), else as a second
launch (`attention_fuse_reduce=False`).

Bytes moved: Hsel·k rows of (d + (D-d) + D)·es bytes, i.e. 2·D·es per row; with group_select
each chosen row is read once for all G query heads of its group. The partials cost
B·Hq·splits·(D+2)·4 bytes, written once and read once.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from keyspace.kernels._checks import check_cache, unit_last_stride, use_triton
from keyspace.kernels.settings import DEFAULT_SETTINGS, KernelSettings

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_attention_split_kernel(
    q_ptr,  # (B, Hq, D) contiguous
    k_low_ptr,  # (B, Hkv, S, D_LOW), last dim contiguous
    k_rest_ptr,  # (B, Hkv, S, D - D_LOW), last dim contiguous
    v_ptr,  # (B, Hkv, S, D), last dim contiguous
    idx_ptr,  # (B, Hsel, K_TOP) int32 contiguous, -1 = unused slot
    low_ptr,  # (B, Hq, S) fp32 q_low·k_low when LOW_SCORES (per-head sets), else a dummy
    part_acc_ptr,  # (B, Hq, SPLITS, D) fp32
    part_ml_ptr,  # (B, Hq, SPLITS, 2) fp32: running max (log2 units) and sum
    out_ptr,  # (B, Hq, D) in the query dtype, written here when FUSED_REDUCE
    counter_ptr,  # (B * Hsel,) int32 zero on entry when FUSED_REDUCE: splits of each set done
    S,
    K_TOP,
    rows_per_split,
    qk_scale,  # softmax scale · log2(e)
    stride_lb,  # k_low strides: batch, head, token (the last dim is contiguous)
    stride_lh,
    stride_ls,
    stride_rb,  # k_rest strides
    stride_rh,
    stride_rs,
    stride_vb,  # v strides
    stride_vh,
    stride_vs,
    Q_HEADS,
    KV_HEADS,
    SEL_HEADS,
    SPLITS,
    D: tl.constexpr,
    D_LOW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DL: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LOW_SCORES: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    BLOCK_G: tl.constexpr,  # next power of two >= HEADS_PER_SET: the heads merged together
    BLOCK_SPLITS: tl.constexpr,
):
    D_REST: tl.constexpr = D - D_LOW
    HEADS_PER_SET = Q_HEADS // SEL_HEADS  # G with group_select, else 1
    SETS_PER_KV = SEL_HEADS // KV_HEADS  # 1 with group_select, else G
    pid_set = tl.program_id(0)  # b * SEL_HEADS + set
    pid_split = tl.program_id(1)
    b = pid_set // SEL_HEADS
    h_set = pid_set % SEL_HEADS
    h_kv = (h_set // SETS_PER_KV).to(tl.int64)
    b64 = b.to(tl.int64)
    k_low_base = k_low_ptr + b64 * stride_lb + h_kv * stride_lh
    k_rest_base = k_rest_ptr + b64 * stride_rb + h_kv * stride_rh
    v_base = v_ptr + b64 * stride_vb + h_kv * stride_vh

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HEADS_PER_SET
    q_heads = b * Q_HEADS + h_set * HEADS_PER_SET + offs_h  # [BLOCK_H]
    offs_dl = tl.arange(0, BLOCK_DL)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + q_heads[:, None] * D
    q_low = tl.load(
        q_rows + offs_dl[None, :],
        mask=h_mask[:, None] & (offs_dl[None, :] < D_LOW),
        other=0.0,
    )
    if D_REST > 0:
        q_rest = tl.load(
            q_rows + D_LOW + offs_dr[None, :],
            mask=h_mask[:, None] & (offs_dr[None, :] < D_REST),
            other=0.0,
        )

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    start = pid_split * rows_per_split
    end = tl.minimum(start + rows_per_split, K_TOP)
    idx_row = idx_ptr + pid_set.to(tl.int64) * K_TOP
    low_row = low_ptr + pid_set.to(tl.int64) * S  # only with LOW_SCORES (one head per set)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tok = tl.load(idx_row + offs_n, mask=offs_n < end, other=-1)  # [BLOCK_N]
        valid = tok >= 0
        rows = tl.where(valid, tok, 0)  # token positions within the (b, KV head) slice
        if LOW_SCORES:
            # q_low·k_low was computed by the score pass: read 4 bytes instead of d·es per row.
            s_low = tl.load(low_row + tl.where(valid, tok, 0), mask=valid, other=0.0)
            s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32) + s_low[None, :]  # [BLOCK_H, BLOCK_N]
        else:
            k_low = tl.load(
                k_low_base + rows[:, None] * stride_ls + offs_dl[None, :],
                mask=valid[:, None] & (offs_dl[None, :] < D_LOW),
                other=0.0,
            )  # [BLOCK_N, BLOCK_DL]
            s = tl.dot(q_low, tl.trans(k_low), input_precision=DOT_PRECISION)
        if D_REST > 0:
            k_rest = tl.load(
                k_rest_base + rows[:, None] * stride_rs + offs_dr[None, :],
                mask=valid[:, None] & (offs_dr[None, :] < D_REST),
                other=0.0,
            )  # [BLOCK_N, BLOCK_DR]
            s += tl.dot(q_rest, tl.trans(k_rest), input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of only unused slots
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + rows[:, None] * stride_vs + offs_dv[None, :],
            mask=valid[:, None] & (offs_dv[None, :] < D),
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    part_rows = q_heads.to(tl.int64) * SPLITS + pid_split  # [BLOCK_H]
    tl.store(
        part_acc_ptr + part_rows[:, None] * D + offs_dv[None, :],
        acc,
        mask=h_mask[:, None] & (offs_dv[None, :] < D),
    )
    tl.store(part_ml_ptr + part_rows * 2, m_i, mask=h_mask)
    tl.store(part_ml_ptr + part_rows * 2 + 1, l_i, mask=h_mask)

    if FUSED_REDUCE:
        # The set's last split to finish merges all of them (its partials are visible after the
        # acquire): no reduce launch, and the merges overlap the other sets' splits.
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + pid_set, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:
            row0 = (b * Q_HEADS + h_set * HEADS_PER_SET).to(tl.int64)
            _merge_splits(
                part_acc_ptr, part_ml_ptr, out_ptr, row0, HEADS_PER_SET, SPLITS, D, BLOCK_G,
                BLOCK_SPLITS, BLOCK_DV,
            )  # fmt: skip


@triton.jit
def _merge_splits(
    part_acc_ptr, part_ml_ptr, out_ptr, row0, n_rows, SPLITS, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Merge the SPLITS partials (acc, max, sum) of query heads row0 .. row0 + n_rows - 1 (at most
    BLOCK_G) and normalise; all heads at once, so their loads are in flight together."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_DV)
    rows = row0 + offs_g  # [BLOCK_G]
    mask = (offs_g < n_rows)[:, None] & (offs_s < SPLITS)[None, :]  # [BLOCK_G, BLOCK_SPLITS]
    parts = rows[:, None] * SPLITS + offs_s[None, :]
    m = tl.load(part_ml_ptr + parts * 2, mask=mask, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(part_ml_ptr + parts * 2 + 1, mask=mask, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # nothing selected: output zeros
    w = tl.exp2(m - m_max[:, None])  # [BLOCK_G, BLOCK_SPLITS]
    acc = tl.load(
        part_acc_ptr + parts[:, :, None] * D + offs_d[None, None, :],
        mask=mask[:, :, None] & (offs_d < D)[None, None, :],
        other=0.0,
        cache_modifier=".cg",
    )  # [BLOCK_G, BLOCK_SPLITS, BLOCK_DV]
    total = tl.sum(acc * w[:, :, None], 1)  # [BLOCK_G, BLOCK_DV]
    denom = tl.sum(sums * w, 1)
    out = total / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * D + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_g < n_rows)[:, None] & (offs_d < D)[None, :],
    )


@triton.jit
def _sparse_attention_reduce_kernel(
    part_acc_ptr,  # (B, Hq, SPLITS, D) fp32
    part_ml_ptr,  # (B, Hq, SPLITS, 2) fp32
    out_ptr,  # (B, Hq, D) in the query dtype
    SPLITS,
    D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * Hq + h
    _merge_splits(part_acc_ptr, part_ml_ptr, out_ptr, row, 1, SPLITS, D, 1, BLOCK_SPLITS, BLOCK_DV)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(k_top: int, n_sets: int, device: torch.device, settings: KernelSettings) -> int:
    """`attention_splits` if set, else split-K for about `attention_programs_per_sm` programs
    per SM (one chunk per set off CUDA)."""
    if settings.attention_splits:
        return settings.attention_splits
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(settings.attention_programs_per_sm * _sm_count(device), max(n_sets, 1))
    return max(1, min(wanted, triton.cdiv(k_top, settings.attention_block_n)))


def _sparse_attention_triton(
    q: torch.Tensor,
    k_low: torch.Tensor,
    k_rest: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
    low_scores: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Launch split + reduce. idx (B, Hsel, k) int32 with Hsel = Hq (per head) or Hkv (group).

    low_scores (B, Hq, S) fp32, optional with one query head per index set: the score pass's
    q_low·k_low, reused instead of gathering k_low again. counter (B·Hsel,) int32, optional:
    already zero (the decode step's score pass zeroes it), else a zeroed one is allocated.
    out (B, Hq, D), optional: contiguous, q's dtype, written in place (else allocated).
    """
    for t in (q, idx):
        assert t.is_contiguous()
    for t in (k_low, k_rest, v):  # any batch / head / token strides, unit stride along dims
        assert t.shape[-1] == 0 or t.stride(-1) == 1
    assert q.dtype == k_low.dtype == k_rest.dtype == v.dtype and idx.dtype == torch.int32
    batch, q_heads, head_dim = q.shape
    _, kv_heads, seq, d = k_low.shape
    sel_heads, k_top = idx.shape[1], idx.shape[2]
    assert sel_heads in (q_heads, kv_heads) and idx.shape[0] == batch
    if low_scores is not None:
        assert sel_heads == q_heads and low_scores.shape == (batch, q_heads, seq)
        assert low_scores.dtype == torch.float32 and low_scores.is_contiguous()
    block_n = settings.attention_block_n
    splits = _num_splits(k_top, batch * sel_heads, q.device, settings)
    rows_per_split = triton.cdiv(triton.cdiv(k_top, splits), block_n) * block_n
    splits = triton.cdiv(k_top, rows_per_split)
    part_acc = torch.empty((batch, q_heads, splits, head_dim), device=q.device, dtype=torch.float32)
    part_ml = torch.empty((batch, q_heads, splits, 2), device=q.device, dtype=torch.float32)
    heads_per_set = q_heads // sel_heads
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    fused = settings.attention_fuse_reduce
    if counter is None or not fused:
        counter = torch.zeros(
            (batch * sel_heads if fused else 1,), device=q.device, dtype=torch.int32
        )
    assert counter.dtype == torch.int32 and counter.numel() >= (batch * sel_heads if fused else 1)
    _sparse_attention_split_kernel[(batch * sel_heads, splits)](
        q,
        k_low,
        k_rest,
        v,
        idx,
        low_scores if low_scores is not None else part_ml,
        part_acc,
        part_ml,
        out,
        counter,
        seq,
        k_top,
        rows_per_split,
        scale * LOG2E,
        *k_low.stride()[:3],
        *k_rest.stride()[:3],
        *v.stride()[:3],
        q_heads,
        kv_heads,
        sel_heads,
        splits,
        D=head_dim,
        D_LOW=d,
        BLOCK_H=max(16, triton.next_power_of_2(heads_per_set)),  # tl.dot needs M >= 16
        BLOCK_DL=max(16, triton.next_power_of_2(d)),
        BLOCK_DR=max(16, triton.next_power_of_2(max(head_dim - d, 1))),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        LOW_SCORES=low_scores is not None,
        FUSED_REDUCE=fused,
        BLOCK_G=triton.next_power_of_2(heads_per_set),
        BLOCK_SPLITS=triton.next_power_of_2(splits),
        num_warps=settings.attention_num_warps,
        num_stages=settings.attention_num_stages,
    )
    if fused:
        return out
    _sparse_attention_reduce_kernel[(batch * q_heads,)](
        part_acc,
        part_ml,
        out,
        splits,
        D=head_dim,
        BLOCK_SPLITS=triton.next_power_of_2(splits),
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim)),
    )
    return out


def sparse_attention(
    q: torch.Tensor,
    k_low: torch.Tensor,
    k_rest: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    low_scores: torch.Tensor | None = None,
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Exact softmax attention of each query head over its selected cache rows.

    Args:
        q: (batch, q_heads, head_dim), in the PCA basis.
        k_low: (batch, kv_heads, seq, d).
        k_rest: (batch, kv_heads, seq, head_dim - d).
        v: (batch, kv_heads, seq, head_dim). The cache tensors may be strided views (read in
            place) as long as their last dim is contiguous.
        idx: (batch, q_heads, k) positions per query head, or (batch, kv_heads, k) shared by
            each KV group; -1 marks an unused slot.
        scale: softmax scale, default 1/sqrt(head_dim).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        low_scores: (batch, q_heads, seq) float32, optional with one index set per query head:
            `lowrank_scores(q, k_low)`, whose q_low·k_low the kernel then reads (4 bytes a row)
            instead of gathering k_low again, as a decode step does. The reference ignores it.
        settings: the Triton launch parameters (`KernelSettings`).

    Returns:
        (batch, q_heads, head_dim) in q's dtype.
    """
    batch, q_heads, kv_heads, seq, _, head_dim = check_cache(q, k_low, k_rest, v)
    if idx.dim() != 3 or idx.shape[0] != batch or idx.shape[1] not in (q_heads, kv_heads):
        raise ValueError(
            f"idx must be (batch, q_heads or kv_heads, k) = ({batch}, {q_heads} or {kv_heads}, k),"
            f" got {tuple(idx.shape)}"
        )
    if idx.dtype.is_floating_point or idx.shape[2] < 1:
        raise ValueError("idx must be a non-empty integer tensor of positions")
    if low_scores is not None and (
        idx.shape[1] != q_heads
        or low_scores.shape != (batch, q_heads, seq)
        or low_scores.dtype != torch.float32
    ):
        raise ValueError(
            f"low_scores must be float32 ({batch}, {q_heads}, {seq}) with one index set per "
            f"query head, got {low_scores.dtype} {tuple(low_scores.shape)} for idx "
            f"{tuple(idx.shape)}"
        )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not use_triton(backend, q, k_low, k_rest, v, idx):
        return sparse_attention_reference(q, k_low, k_rest, v, idx, scale)
    tensors = [q.contiguous()] + [unit_last_stride(t) for t in (k_low, k_rest, v)]
    idx = idx.to(torch.int32).contiguous()
    if low_scores is not None:
        low_scores = low_scores.contiguous()
    return _sparse_attention_triton(*tensors, idx, scale, low_scores, settings=settings)


def sparse_attention_reference(
    q: torch.Tensor,
    k_low: torch.Tensor,
    k_rest: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-torch fp32 version of `sparse_attention`, same arguments and result."""
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_low.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    keys = torch.cat([k_low, k_rest], dim=-1).float()  # [B, Hkv, S, D]
    group = q_heads // kv_heads
    # One index row per query head: [B, Hq, k].
    idx = idx.long() if idx.shape[1] == q_heads else idx.long().repeat_interleave(group, dim=1)
    valid = idx >= 0
    safe = idx.clamp(min=0)
    kv_of_head = torch.arange(q_heads, device=q.device) // group  # [Hq]
    k_sel = keys[:, kv_of_head].gather(2, safe[..., None].expand(-1, -1, -1, head_dim))
    v_sel = v.float()[:, kv_of_head].gather(2, safe[..., None].expand(-1, -1, -1, head_dim))
    logits = torch.einsum("bhd,bhkd->bhk", q.float(), k_sel) * scale  # [B, Hq, k]
    logits = logits.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with nothing selected -> 0
    out = torch.einsum("bhk,bhkd->bhd", weights, v_sel)
    return out.to(q.dtype)
