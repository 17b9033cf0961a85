"""Adaptive low-rank scores: each step scores tokens with r coordinates of the basis chosen from
the query itself, shared by the G query heads of a KV head.

The store keeps the first d_max rotated key coordinates of each KV head coordinate-major,
`k_low_t (B, Hkv, d_max, S)`, so one coordinate's S values are contiguous and reading r chosen
coordinates is r contiguous streams. `adaptive_coords` picks, per (batch, KV head), the r
largest of Σ_{h in group} |q_h,j|·σ_j (σ_j the coordinate's key scale, 1 without one);
`adaptive_scores` then computes, for each query head h of KV head g,
s[b, h, t] = Σ_{j in coords[b, g]} q[b, h, j]·k_low_t[b, g, j, t], in fp32, or the G heads'
sum with `group_select`. With coords = arange(d) it is the fixed-d `lowrank_scores`.

One program owns a tile of `adaptive_block_s` tokens of one (batch, KV head) and walks its r
coordinates `adaptive_block_r` at a time: each step loads a (block_r, block_s) tile, one
contiguous run per coordinate, and accumulates it into all G query heads (a tensor-core dot for
per-head rows under GQA, a GEMV of the group's summed query otherwise), so each chosen coordinate
stream is read once per KV head.

Bytes moved per step: reads B·Hkv·r·S·es of `k_low_t` (es = element size) plus the queries'
chosen coordinates (B·Hq·r·es) and the coordinates (B·Hkv·r·4); writes B·Hsel·S·4 bytes of fp32
scores (Hsel = Hkv with group_select, else Hq). Positions at or past `seqlens[b]` are -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keyspace.kernels._checks import (
    FLOAT_DTYPES,
    check_seqlens,
    selected_heads,
    unit_last_stride,
    use_triton,
)
from keyspace.kernels.scores import TILE_MAJOR_MAX_ROWS
from keyspace.kernels.settings import DEFAULT_SETTINGS, KernelSettings


@triton.jit
def _adaptive_scores_kernel(
    q_ptr,  # (B, Hq, >= d_max), last dim contiguous
    k_ptr,  # (B, Hkv, d_max, S): one coordinate's S values contiguous, any other strides
    coords_ptr,  # (B, Hkv, R) int32 contiguous, each in [0, d_max)
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    out_ptr,  # (B, Hsel, S) fp32 contiguous
    counter_ptr,  # (B * Hsel,) int32 to zero when ZERO_COUNTERS (the attention's split counters)
    S,
    R,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kd,
    Q_HEADS,
    KV_HEADS,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
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
        if pid_s == 0:  # as in scores.py: saves the decode step a memset
            sets = 1 if ONE_ROW else GROUP
            offs_c = tl.arange(0, BLOCK_H)
            tl.store(counter_ptr + pid_bh * sets + offs_c, tl.zeros([BLOCK_H], tl.int32),
                     mask=offs_c < sets)  # fmt: skip

    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    h_mask = offs_h < GROUP
    s_mask = offs_s < S
    q_rows = q_ptr + b * stride_qb + (h_kv * GROUP + offs_h)[:, None] * stride_qh  # [BLOCK_H, 1]
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    coords_row = coords_ptr + pid_bh.to(tl.int64) * R

    acc_row = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_S], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_mask = r0 + offs_r < R
        coord = tl.load(coords_row + r0 + offs_r, mask=r_mask, other=0)  # [BLOCK_R]
        # q_sel: [BLOCK_H, BLOCK_R], the group's queries at the chosen coordinates.
        q_sel = tl.load(q_rows + coord[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
        # k_tile: [BLOCK_R, BLOCK_S], one contiguous run of tokens per chosen coordinate.
        k_tile = tl.load(
            k_base + coord.to(tl.int64)[:, None] * stride_kd + offs_s[None, :],
            mask=r_mask[:, None] & s_mask[None, :],
            other=0.0,
            eviction_policy=EVICT,
        )
        if ONE_ROW:
            # The G scores sum to (Σ_h q_h)·k: one multiply-add per element of the tile.
            q_sum = tl.sum(q_sel.to(tl.float32), axis=0)  # [BLOCK_R]
            acc_row += tl.sum(k_tile.to(tl.float32) * q_sum[:, None], axis=0)
        else:
            acc += tl.dot(q_sel, k_tile, input_precision=DOT_PRECISION)

    length = S
    if HAS_SEQLENS:
        length = tl.minimum(tl.load(seqlens_ptr + b).to(tl.int32), S)
    valid = offs_s < length
    if ONE_ROW:
        row = tl.where(valid, acc_row, float("-inf"))
        tl.store(out_ptr + pid_bh.to(tl.int64) * S + offs_s, row, mask=s_mask)
    else:
        scores = tl.where(valid[None, :], acc, float("-inf"))
        rows = (b * Q_HEADS + h_kv * GROUP + offs_h).to(tl.int64) * S
        tl.store(out_ptr + rows[:, None] + offs_s[None, :], scores,
                 mask=h_mask[:, None] & s_mask[None, :])  # fmt: skip


@triton.jit
def _adaptive_fused_kernel(
    q_ptr,  # (B, Hq, >= d_max), last dim contiguous
    k_ptr,  # (B, Hkv, d_max, S): one coordinate's S values contiguous, any other strides
    sigma_ptr,  # (Hkv, d_max) fp32 contiguous, or a dummy when HAS_SIGMA is False
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    out_ptr,  # (B, Hsel, S) fp32 contiguous
    counter_ptr,  # (B * Hsel,) int32 to zero when ZERO_COUNTERS
    S,
    R,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kd,
    Q_HEADS,
    KV_HEADS,
    D_MAX: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D_MAX
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_ROW: tl.constexpr,
    HAS_SIGMA: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVICT: tl.constexpr,
    TILE_MAJOR: tl.constexpr,
    ZERO_COUNTERS: tl.constexpr,
):
    """The coordinate choice and the score pass in one program: each program ranks the d_max
    weights w_j = σ_j·Σ_group |q_j| itself (ties to the lower index), then reads only the rows
    of the r chosen coordinates (masked loads of the others move no bytes)."""
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
        if pid_s == 0:
            sets = 1 if ONE_ROW else GROUP
            offs_c = tl.arange(0, BLOCK_H)
            tl.store(counter_ptr + pid_bh * sets + offs_c, tl.zeros([BLOCK_H], tl.int32),
                     mask=offs_c < sets)  # fmt: skip

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    h_mask = offs_h < GROUP
    d_mask = offs_d < D_MAX
    s_mask = offs_s < S
    q_rows = q_ptr + b * stride_qb + (h_kv * GROUP + offs_h)[:, None] * stride_qh  # [BLOCK_H, 1]
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh

    # The weights of all d_max coordinates, once per program.
    q_all = tl.load(q_rows + offs_d[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    w_all = tl.sum(tl.abs(q_all.to(tl.float32)), axis=0)  # [BLOCK_D]
    if HAS_SIGMA:
        w_all *= tl.load(sigma_ptr + h_kv * D_MAX + offs_d, mask=d_mask, other=0.0)
    w_all = tl.where(d_mask, w_all, -1.0)  # padding: below every weight, never chosen

    acc_row = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_S], tl.float32)
    for c0 in tl.static_range(0, BLOCK_D, BLOCK_R):
        offs_c = c0 + offs_r  # [BLOCK_R]
        c_mask = offs_c < D_MAX
        same = offs_d[None, :] == offs_c[:, None]  # [BLOCK_R, BLOCK_D]
        # w_c picked out of w_all (adding zeros is exact), so both sides of a comparison agree.
        w_c = tl.sum(tl.where(same, w_all[None, :], 0.0), axis=1)  # [BLOCK_R]
        beats = (w_all[None, :] > w_c[:, None]) | (
            (w_all[None, :] == w_c[:, None]) & (offs_d[None, :] < offs_c[:, None])
        )
        rank = tl.sum(beats.to(tl.int32), axis=1)  # coordinates ahead of each one
        chosen = (rank < R) & c_mask  # [BLOCK_R]
        q_c = tl.load(q_rows + offs_c[None, :], mask=h_mask[:, None] & chosen[None, :], other=0.0)
        k_tile = tl.load(
            k_base + offs_c.to(tl.int64)[:, None] * stride_kd + offs_s[None, :],
            mask=chosen[:, None] & s_mask[None, :],
            other=0.0,
            eviction_policy=EVICT,
        )
        if ONE_ROW:
            q_sum = tl.sum(q_c.to(tl.float32), axis=0)  # [BLOCK_R], zero where not chosen
            acc_row += tl.sum(k_tile.to(tl.float32) * q_sum[:, None], axis=0)
        else:
            acc += tl.dot(q_c, k_tile, input_precision=DOT_PRECISION)

    length = S
    if HAS_SEQLENS:
        length = tl.minimum(tl.load(seqlens_ptr + b).to(tl.int32), S)
    valid = offs_s < length
    if ONE_ROW:
        row = tl.where(valid, acc_row, float("-inf"))
        tl.store(out_ptr + pid_bh.to(tl.int64) * S + offs_s, row, mask=s_mask)
    else:
        scores = tl.where(valid[None, :], acc, float("-inf"))
        rows = (b * Q_HEADS + h_kv * GROUP + offs_h).to(tl.int64) * S
        tl.store(out_ptr + rows[:, None] + offs_s[None, :], scores,
                 mask=h_mask[:, None] & s_mask[None, :])  # fmt: skip


def _adaptive_fused_triton(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    r: int,
    sigma: torch.Tensor | None,
    group_select: bool,
    seqlens: torch.Tensor | None,
    counters: torch.Tensor | None = None,
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Launch the kernel that chooses the r coordinates and scores in one pass. q (B, Hq, >= d_max)
    with unit last stride; k_low_t (B, Hkv, d_max, S) with unit last stride; sigma (Hkv, d_max)
    fp32 contiguous or None. The same result as `adaptive_coords` then `_adaptive_scores_triton`
    (up to ties between equal weights, which go to the lower coordinate here)."""
    assert q.dtype == k_low_t.dtype and q.stride(-1) == 1
    assert k_low_t.shape[-1] == 1 or k_low_t.stride(-1) == 1
    batch, q_heads, _ = q.shape
    _, kv_heads, d_max, seq = k_low_t.shape
    assert q_heads % kv_heads == 0 and q.shape[2] >= d_max and 1 <= r <= d_max
    assert sigma is None or (
        sigma.dtype == torch.float32 and sigma.is_contiguous() and sigma.shape == (kv_heads, d_max)
    )
    out_heads = selected_heads(q_heads, kv_heads, group_select)
    out = torch.empty((batch, out_heads, seq), device=q.device, dtype=torch.float32)
    assert counters is None or (counters.numel() == batch * out_heads and counters.is_contiguous())
    group = q_heads // kv_heads
    tile_major = settings.scores_tile_major and batch * kv_heads <= TILE_MAJOR_MAX_ROWS
    tiles = triton.cdiv(seq, settings.adaptive_block_s)
    grid = (tiles, batch * kv_heads) if tile_major else (batch * kv_heads, tiles)
    _adaptive_fused_kernel[grid](
        q, k_low_t, sigma if sigma is not None else out, seqlens if seqlens is not None else out,
        out, counters if counters is not None else out,
        seq, r, q.stride(0), q.stride(1), *k_low_t.stride()[:3], q_heads, kv_heads,
        D_MAX=d_max,
        BLOCK_D=max(settings.adaptive_block_r, triton.next_power_of_2(d_max)),
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        BLOCK_R=settings.adaptive_block_r,
        BLOCK_S=settings.adaptive_block_s,
        ONE_ROW=group_select or group == 1,
        HAS_SIGMA=sigma is not None,
        HAS_SEQLENS=seqlens is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        EVICT="evict_first" if settings.scores_evict_first else "",
        TILE_MAJOR=tile_major,
        ZERO_COUNTERS=counters is not None,
        num_warps=settings.adaptive_num_warps,
    )  # fmt: skip
    return out


def _adaptive_scores_triton(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    coords: torch.Tensor,
    group_select: bool,
    seqlens: torch.Tensor | None,
    counters: torch.Tensor | None = None,
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Launch the adaptive score kernel. q (B, Hq, >= d_max) with unit last stride; k_low_t
    (B, Hkv, d_max, S) with unit last stride; coords (B, Hkv, r) int32 contiguous.

    counters: optional (B·Hsel,) int32 that the kernel sets to zero (the decode step's split
    counters for the attention)."""
    assert q.dtype == k_low_t.dtype and q.stride(-1) == 1
    assert k_low_t.shape[-1] == 1 or k_low_t.stride(-1) == 1
    assert coords.dtype == torch.int32 and coords.is_contiguous()
    batch, q_heads, _ = q.shape
    _, kv_heads, d_max, seq = k_low_t.shape
    assert q_heads % kv_heads == 0 and q.shape[2] >= d_max
    assert coords.shape[:2] == (batch, kv_heads) and 1 <= coords.shape[2] <= d_max
    out_heads = selected_heads(q_heads, kv_heads, group_select)
    out = torch.empty((batch, out_heads, seq), device=q.device, dtype=torch.float32)
    assert counters is None or (counters.numel() == batch * out_heads and counters.is_contiguous())
    group = q_heads // kv_heads
    tile_major = settings.scores_tile_major and batch * kv_heads <= TILE_MAJOR_MAX_ROWS
    tiles = triton.cdiv(seq, settings.adaptive_block_s)
    grid = (tiles, batch * kv_heads) if tile_major else (batch * kv_heads, tiles)
    _adaptive_scores_kernel[grid](
        q, k_low_t, coords, seqlens if seqlens is not None else out, out,
        counters if counters is not None else out,
        seq, coords.shape[2], q.stride(0), q.stride(1), *k_low_t.stride()[:3], q_heads, kv_heads,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        BLOCK_R=settings.adaptive_block_r,
        BLOCK_S=settings.adaptive_block_s,
        ONE_ROW=group_select or group == 1,
        HAS_SEQLENS=seqlens is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        EVICT="evict_first" if settings.scores_evict_first else "",
        TILE_MAJOR=tile_major,
        ZERO_COUNTERS=counters is not None,
        num_warps=settings.adaptive_num_warps,
    )  # fmt: skip
    return out


def check_adaptive(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    coords: torch.Tensor | None,
    seqlens: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Check the adaptive score operands (coords may be None: not chosen yet); return
    (B, Hq, Hkv, d_max, S)."""
    if q.dim() != 3 or k_low_t.dim() != 4:
        raise ValueError(
            f"q must be (batch, q_heads, head_dim) and k_low_t (batch, kv_heads, d_max, seq), "
            f"got {tuple(q.shape)} and {tuple(k_low_t.shape)}"
        )
    batch, q_heads, head_dim = q.shape
    kb, kv_heads, d_max, seq = k_low_t.shape
    if kb != batch or kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not match k_low_t {tuple(k_low_t.shape)}")
    if not 1 <= d_max <= head_dim or seq < 1:
        raise ValueError(f"k_low_t needs 1 <= d_max <= D={head_dim} and seq >= 1, got {d_max}")
    for name, t in (("q", q), ("k_low_t", k_low_t)):
        if t.dtype not in FLOAT_DTYPES or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be float16/bfloat16/float32 like q, on q's device")
    if coords is not None:
        check_coords(coords, batch, kv_heads, d_max, q.device)
    check_seqlens(seqlens, batch, seq, q.device)
    return batch, q_heads, kv_heads, d_max, seq


def check_coords(coords, batch: int, kv_heads: int, d_max: int, device) -> None:
    """coords (B, Hkv, r) integer, 1 <= r <= d_max; values checked on CPU only (no sync)."""
    if coords.dim() != 3 or coords.shape[:2] != (batch, kv_heads):
        raise ValueError(f"coords must be ({batch}, {kv_heads}, r), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool or coords.device != device:
        raise ValueError(f"coords must be an integer tensor on {device}, got {coords.dtype}")
    if not 1 <= coords.shape[2] <= d_max:
        raise ValueError(f"coords must choose r in [1, d_max={d_max}], got r={coords.shape[2]}")
    if not coords.is_cuda and (int(coords.min()) < 0 or int(coords.max()) >= d_max):
        raise ValueError(f"coords must lie in [0, d_max={d_max})")


def adaptive_coords(
    q: torch.Tensor, r: int, kv_heads: int, d_max: int, sigma: torch.Tensor | None = None
) -> torch.Tensor:
    """Per (batch, KV head), the r coordinates with the largest Σ_{h in group} |q_h,j|·σ_j.

    Args:
        q: (batch, q_heads, head_dim), rotated; only the first d_max columns are read.
        r: coordinates chosen, in [1, d_max].
        kv_heads: KV heads; q_heads must be a multiple.
        d_max: the coordinates stored (k_low_t's third dim).
        sigma: (kv_heads, d_max) fp32 key scale per coordinate, or None (all 1).

    Returns:
        (batch, kv_heads, r) int32, ascending within each row. Plain torch, no host sync.
    """
    batch, q_heads, head_dim = q.shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d_max <= head_dim:
        raise ValueError(f"need 1 <= r <= d_max <= head_dim={head_dim}, got r={r}, d_max={d_max}")
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"Hq={q_heads} query heads is not a multiple of Hkv={kv_heads} KV heads")
    weight = q[..., :d_max].float().abs().reshape(batch, kv_heads, -1, d_max).sum(2)  # [B,Hkv,d]
    if sigma is not None:
        if sigma.shape != (kv_heads, d_max):
            raise ValueError(f"sigma must be ({kv_heads}, {d_max}), got {tuple(sigma.shape)}")
        weight = weight * sigma.to(device=q.device, dtype=torch.float32)
    # Ties go to the lower coordinate, as in the fused kernel: a stable descending sort.
    chosen = weight.sort(dim=-1, descending=True, stable=True).indices[..., :r]  # [B, Hkv, r]
    return chosen.sort(dim=-1).values.to(torch.int32)


def adaptive_scores(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    coords: torch.Tensor,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Score every cached token with the chosen coordinates of its KV head.

    Args:
        q: (batch, q_heads, head_dim), rotated; the first d_max columns are read.
        k_low_t: (batch, kv_heads, d_max, seq), coordinate-major: any strides with a contiguous
            last dim (e.g. `buffer[..., :seq]` of a preallocated store) are read in place.
        coords: (batch, kv_heads, r) integer, each in [0, d_max), e.g. from `adaptive_coords`.
        group_select: sum the scores of each KV head's query heads into one row.
        seqlens: (batch,) valid length per sequence; positions past it score -inf.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        settings: the Triton launch parameters (`KernelSettings`).

    Returns:
        (batch, kv_heads if group_select else q_heads, seq) float32 scores.
    """
    check_adaptive(q, k_low_t, coords, seqlens)
    if not use_triton(backend, q, k_low_t, coords):
        return adaptive_scores_reference(q, k_low_t, coords, group_select, seqlens)
    q, k_low_t = q if q.stride(-1) == 1 else q.contiguous(), unit_last_stride(k_low_t)
    coords = coords.to(torch.int32).contiguous()
    return _adaptive_scores_triton(q, k_low_t, coords, group_select, seqlens, settings=settings)


def adaptive_fused_scores(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    r: int,
    sigma: torch.Tensor | None = None,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """`adaptive_coords` then `adaptive_scores` in one kernel: each program ranks the d_max
    coordinate weights Σ_group |q_j|·σ_j itself and reads only the r chosen coordinate streams.

    Args as `adaptive_scores`, with r (coordinates chosen, in [1, d_max]) and sigma ((kv_heads,
    d_max) key scale per coordinate, or None) instead of coords. Returns the same scores.
    """
    batch, _, kv_heads, d_max, _ = check_adaptive(q, k_low_t, None, seqlens)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d_max:
        raise ValueError(f"r must be an int in [1, d_max={d_max}], got {r!r}")
    if sigma is not None and tuple(sigma.shape) != (kv_heads, d_max):
        raise ValueError(f"sigma must be ({kv_heads}, {d_max}), got {tuple(sigma.shape)}")
    if not use_triton(backend, q, k_low_t):
        coords = adaptive_coords(q, r, kv_heads, d_max, sigma)
        return adaptive_scores_reference(q, k_low_t, coords, group_select, seqlens)
    q, k_low_t = q if q.stride(-1) == 1 else q.contiguous(), unit_last_stride(k_low_t)
    if sigma is not None:
        sigma = sigma.to(device=q.device, dtype=torch.float32).contiguous()
    return _adaptive_fused_triton(q, k_low_t, r, sigma, group_select, seqlens, settings=settings)


def adaptive_scores_reference(
    q: torch.Tensor,
    k_low_t: torch.Tensor,
    coords: torch.Tensor,
    group_select: bool = False,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch fp32 version of `adaptive_scores`, same arguments and result."""
    batch, q_heads, _ = q.shape
    _, kv_heads, d_max, seq = k_low_t.shape
    idx = coords.long()  # [B, Hkv, r]
    q_grp = q[..., :d_max].float().reshape(batch, kv_heads, -1, d_max)  # [B, Hkv, G, d_max]
    q_sel = q_grp.gather(3, idx[:, :, None, :].expand(-1, -1, q_grp.shape[2], -1))  # [B,Hkv,G,r]
    k_sel = k_low_t.float().gather(2, idx[..., None].expand(-1, -1, -1, seq))  # [B, Hkv, r, S]
    scores = torch.einsum("bhgr,bhrs->bhgs", q_sel, k_sel)  # [B, Hkv, G, S]
    scores = scores.sum(2) if group_select else scores.reshape(batch, q_heads, seq)
    if seqlens is not None:
        past_end = torch.arange(seq, device=q.device)[None, :] >= seqlens[:, None]  # [B, S]
        scores = scores.masked_fill(past_end[:, None, :], float("-inf"))
    return scores
