"""Exact top-k selection by radix select over the fp32 score bits.

Each fp32 score maps to a uint32 key whose unsigned order is the float order. Up to four passes
of an 8-bit histogram (`tl.histogram`) walk the key from its top byte down and pin the k-th
largest key T; a pass is skipped once the boundary bucket is taken whole. A last pass compacts:
every key above T is kept, and keys equal to T are kept until k are chosen. The result is an
exact top-k; which of several exactly tied scores at T is kept is not specified.

Two launch shapes compute the same thing:
- "grid" (default on CUDA): every pass is a launch over (row, tile) programs, so the whole GPU
  works on every pass even with few rows (GQA groups: B·Hkv = 128 rows). Histograms meet in a
  small int32 workspace through atomics; each program recomputes the row's state from the
  histograms of the earlier passes. Compaction takes output slots with an atomic counter per row.
- "row": one program per row runs all passes in a loop (no atomics, indices in position order).

Slots past min(k, seqlens[b]) hold -1. Indices come out unordered; attention does not care.

Bytes moved: each pass reads the score rows (S·4 bytes a row; at decode sizes mostly from L2)
and writes Hsel·k·4 bytes of int32 indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keyspace.kernels._checks import check_k_top, use_triton

SELECT_IMPL = "grid"  # "grid" or "row", see the header
RADIX_BITS = 8
NUM_PASSES = 32 // RADIX_BITS
# "grid": 1024 scores per program (8 per thread at 4 warps) gives S/1024 programs per row.
TILE = 1024
TILE_WARPS = 4
# "row": 4096 fp32 per chunk, 16 per thread at 8 warps.
CHUNK = 4096
NUM_WARPS = 8


@triton.jit
def _float_to_ordered_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits >> 31
    return tl.where(sign == 1, ~bits, bits | 0x80000000)


@triton.jit
def _next_state(hist, prefix, prefix_mask, remaining, done, shift, RADIX_BITS: tl.constexpr):
    """Fold one pass's histogram into the row state (prefix of T, its mask, keys still needed)."""
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    bins = tl.arange(0, NUM_BINS)
    # The digit of T is the largest bin whose count of keys at or above it reaches `remaining`.
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    digit = tl.max(tl.where(at_or_above >= remaining, bins, -1), 0)
    above = tl.sum(tl.where(bins == digit, at_or_above - hist, 0), 0)
    in_digit = tl.sum(tl.where(bins == digit, hist, 0), 0)
    new_remaining = remaining - above
    # A finished row keeps its state (its pass counted nothing).
    prefix = tl.where(done, prefix, prefix | (digit.to(tl.uint32) << shift))
    digit_mask = tl.full([], NUM_BINS - 1, tl.uint32)
    prefix_mask = tl.where(done, prefix_mask, prefix_mask | (digit_mask << shift))
    remaining = tl.where(done, remaining, new_remaining)
    done = done | (in_digit == new_remaining)
    return prefix, prefix_mask, remaining, done


@triton.jit
def _row_length(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS: tl.constexpr):
    length = S
    if HAS_SEQLENS:
        length = tl.maximum(tl.minimum(tl.load(seqlens_ptr + row // SEL_HEADS).to(tl.int32), S), 0)
    return length, tl.minimum(K_TOP, length)


@triton.jit
def _state_from_hists(ws_ptr, k, PASSES: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The row state after PASSES passes, from the histograms in the workspace row ws_ptr."""
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    prefix = tl.full([], 0, tl.uint32)
    prefix_mask = tl.full([], 0, tl.uint32)
    remaining = k
    done = k <= 0
    for p in tl.static_range(PASSES):
        hist = tl.load(ws_ptr + p * NUM_BINS + tl.arange(0, NUM_BINS))
        shift = 32 - RADIX_BITS * (p + 1)
        prefix, prefix_mask, remaining, done = _next_state(
            hist, prefix, prefix_mask, remaining, done, shift, RADIX_BITS
        )
    return prefix, prefix_mask, remaining, done


@triton.jit
def _radix_pass_kernel(
    scores_ptr,  # (R, S) fp32 contiguous
    seqlens_ptr,  # (B,) int, or a dummy
    ws_ptr,  # (R, WS) int32 zeroed: NUM_PASSES histograms of 2^RADIX_BITS bins, 2 counters
    S,
    K_TOP,
    SEL_HEADS,
    WS,
    PASS: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    TILE: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0)
    length, k = _row_length(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS)
    ws_row = ws_ptr + row.to(tl.int64) * WS
    prefix, prefix_mask, _, done = _state_from_hists(ws_row, k, PASS, RADIX_BITS)
    offs = tl.program_id(1) * TILE + tl.arange(0, TILE)
    in_row = offs < tl.where(done, 0, length)  # a finished row reads nothing
    key = _float_to_ordered_key(
        tl.load(scores_ptr + row.to(tl.int64) * S + offs, mask=in_row, other=0.0)
    )
    shift: tl.constexpr = 32 - RADIX_BITS * (PASS + 1)
    digit = ((key >> shift) & (NUM_BINS - 1)).to(tl.int32)
    hist = tl.histogram(digit, NUM_BINS, mask=in_row & ((key & prefix_mask) == prefix))
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(ws_row + PASS * NUM_BINS + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _radix_compact_kernel(
    scores_ptr,  # (R, S) fp32 contiguous
    seqlens_ptr,  # (B,) int, or a dummy
    ws_ptr,  # (R, WS) int32 after the passes
    idx_ptr,  # (R, K_TOP) int32
    S,
    K_TOP,
    SEL_HEADS,
    WS,
    NUM_PASSES: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    TILE: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0)
    tile = tl.program_id(1)
    length, k = _row_length(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS)
    ws_row = ws_ptr + row.to(tl.int64) * WS
    prefix, prefix_mask, remaining, _ = _state_from_hists(ws_row, k, NUM_PASSES, RADIX_BITS)
    offs = tile * TILE + tl.arange(0, TILE)
    in_row = offs < length
    x = tl.load(scores_ptr + row.to(tl.int64) * S + offs, mask=in_row, other=0.0)
    masked = _float_to_ordered_key(x) & prefix_mask
    greater = in_row & (masked > prefix)
    equal = in_row & (masked == prefix)
    # One scan counts both kinds: strictly-greater in the low 16 bits, ties in the high 16 bits.
    flags = greater.to(tl.int32) + (equal.to(tl.int32) << 16)
    packed = tl.cumsum(flags, 0)
    total = tl.sum(flags, 0)
    counters = ws_row + NUM_PASSES * NUM_BINS
    base_greater = tl.atomic_add(counters, total & 0xFFFF, sem="relaxed")
    base_equal = tl.atomic_add(counters + 1, total >> 16, sem="relaxed")
    out_ptr = idx_ptr + row.to(tl.int64) * K_TOP
    rank_greater = base_greater + (packed & 0xFFFF) - 1
    rank_equal = base_equal + (packed >> 16) - 1
    tl.store(out_ptr + rank_greater, offs, mask=greater)
    tl.store(out_ptr + (k - remaining) + rank_equal, offs, mask=equal & (rank_equal < remaining))
    if tile == 0:
        for start in range(k, K_TOP, TILE):
            fill = start + tl.arange(0, TILE)
            tl.store(out_ptr + fill, -1, mask=fill < K_TOP)


@triton.jit
def _radix_select_row_kernel(
    scores_ptr,  # (R, S) fp32 contiguous, R = B * Hsel
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    idx_ptr,  # (R, K_TOP) int32 contiguous
    S,
    K_TOP,
    SEL_HEADS,
    HAS_SEQLENS: tl.constexpr,
    CHUNK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0)
    row_ptr = scores_ptr + row.to(tl.int64) * S
    length, k = _row_length(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS)
    offs = tl.arange(0, CHUNK)
    prefix = tl.full([], 0, tl.uint32)
    prefix_mask = tl.full([], 0, tl.uint32)
    remaining = k
    done = k <= 0
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)
        hist = tl.zeros([NUM_BINS], dtype=tl.int32)
        end = tl.where(done, 0, length)
        for start in range(0, end, CHUNK):
            in_row = start + offs < end
            key = _float_to_ordered_key(tl.load(row_ptr + start + offs, mask=in_row, other=0.0))
            digit = ((key >> shift) & (NUM_BINS - 1)).to(tl.int32)
            hist += tl.histogram(digit, NUM_BINS, mask=in_row & ((key & prefix_mask) == prefix))
        prefix, prefix_mask, remaining, done = _next_state(
            hist, prefix, prefix_mask, remaining, done, shift, RADIX_BITS
        )
    # Compaction in position order: keys above T fill [0, k - remaining), ties the rest.
    out_ptr = idx_ptr + row.to(tl.int64) * K_TOP
    taken = tl.zeros([], tl.int32)  # strictly-greater in the low 16 bits, ties in the high 16
    for start in range(0, length, CHUNK):
        in_row = start + offs < length
        masked = (
            _float_to_ordered_key(tl.load(row_ptr + start + offs, mask=in_row, other=0.0))
            & prefix_mask
        )
        greater = in_row & (masked > prefix)
        equal = in_row & (masked == prefix)
        flags = greater.to(tl.int32) + (equal.to(tl.int32) << 16)
        packed = taken + tl.cumsum(flags, 0)
        rank_equal = (packed >> 16) - 1
        tl.store(out_ptr + (packed & 0xFFFF) - 1, start + offs, mask=greater)
        tl.store(
            out_ptr + (k - remaining) + rank_equal,
            start + offs,
            mask=equal & (rank_equal < remaining),
        )
        taken += tl.sum(flags, 0)
    for start in range(k, K_TOP, CHUNK):
        tl.store(out_ptr + start + offs, -1, mask=start + offs < K_TOP)


def _select_topk_triton(
    scores: torch.Tensor, k_top: int, seqlens: torch.Tensor | None
) -> torch.Tensor:
    """Launch the radix select. scores (B, Hsel, S) fp32 contiguous -> (B, Hsel, k_top) int32."""
    assert scores.dtype == torch.float32 and scores.is_contiguous() and scores.dim() == 3
    batch, sel_heads, seq = scores.shape
    assert 1 <= k_top <= seq
    assert SELECT_IMPL == "grid" or seq < 1 << 16  # the row kernel's packed scan counts in 16 bits
    rows = batch * sel_heads
    idx = torch.empty((batch, sel_heads, k_top), device=scores.device, dtype=torch.int32)
    lens = seqlens if seqlens is not None else idx
    common = dict(HAS_SEQLENS=seqlens is not None, RADIX_BITS=RADIX_BITS)
    if SELECT_IMPL == "row":
        _radix_select_row_kernel[(rows,)](
            scores, lens, idx, seq, k_top, sel_heads, CHUNK=CHUNK, num_warps=NUM_WARPS, **common
        )
        return idx
    ws_width = NUM_PASSES * (1 << RADIX_BITS) + 2
    ws = torch.zeros((rows, ws_width), device=scores.device, dtype=torch.int32)
    grid = (rows, triton.cdiv(seq, TILE))
    for p in range(NUM_PASSES):
        _radix_pass_kernel[grid](
            scores, lens, ws, seq, k_top, sel_heads, ws_width, PASS=p, TILE=TILE,
            num_warps=TILE_WARPS, **common,
        )  # fmt: skip
    _radix_compact_kernel[grid](
        scores, lens, ws, idx, seq, k_top, sel_heads, ws_width, NUM_PASSES=NUM_PASSES, TILE=TILE,
        num_warps=TILE_WARPS, **common,
    )  # fmt: skip
    return idx


def select_topk(
    scores: torch.Tensor,
    k_top: int,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact top-k positions of each score row.

    Args:
        scores: (batch, heads, seq) float32, e.g. from `lowrank_scores`.
        k_top: positions kept per row, in [1, seq].
        seqlens: (batch,) valid length per sequence; positions past it are never chosen.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        (batch, heads, k_top) int32 positions, in no particular order; -1 pads rows whose
        sequence is shorter than k_top.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (batch, heads, seq), got shape {tuple(scores.shape)}")
    check_k_top(k_top, scores.shape[-1])
    if seqlens is not None and seqlens.shape != (scores.shape[0],):
        raise ValueError(
            f"seqlens must have shape ({scores.shape[0]},), got {tuple(seqlens.shape)}"
        )
    if not use_triton(backend, scores):
        return select_topk_reference(scores, k_top, seqlens)
    return _select_topk_triton(scores.float().contiguous(), k_top, seqlens)


def select_topk_reference(
    scores: torch.Tensor, k_top: int, seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """`torch.topk` version of `select_topk`, same arguments and result (up to order and ties)."""
    seq = scores.shape[-1]
    scores = scores.float()
    if seqlens is not None:
        past_end = torch.arange(seq, device=scores.device)[None, :] >= seqlens[:, None]  # [B, S]
        scores = scores.masked_fill(past_end[:, None, :], float("-inf"))
    idx = scores.topk(k_top, dim=-1, sorted=False).indices  # [B, H, k]
    if seqlens is not None:
        idx = torch.where(idx < seqlens[:, None, None], idx, -1)
    return idx.to(torch.int32)
