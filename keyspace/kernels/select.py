"""Exact top-k selection by radix select over the fp32 score bits.

One program owns one score row (one query head, or one KV group with group_select). Each fp32 is
mapped to a uint32 key whose unsigned order is the float order. Up to four passes of an 8-bit
histogram (`tl.histogram`) walk the key from its top byte down and pin the k-th largest key T;
a pass stops early once the boundary bucket is taken whole. A last pass compacts: every key
above T is kept, and keys equal to T are kept in position order until k are chosen. Ties are
therefore broken towards lower positions, and the result is an exact top-k.

The indices come out in increasing position order (strictly-greater first, then the ties), which
helps the gather in the attention stage; attention does not depend on their order. Slots past
min(k, seqlens[b]) hold -1.

Bytes moved: each pass reads the row (S·4 bytes); with rows of 16-128 KB the later passes mostly
hit L2. Writes Hsel·k·4 bytes of int32 indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keyspace.kernels._checks import check_k_top, use_triton

# 4096 fp32 per chunk: 16 per thread at 8 warps, one chunk per pass at S=4096.
CHUNK = 4096
NUM_WARPS = 8
RADIX_BITS = 8
LINEAR_FIRST = False  # first pass on equal-width value bins (see the kernel); False = pure radix


@triton.jit
def _float_to_ordered_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits >> 31
    return tl.where(sign == 1, ~bits, bits | 0x80000000)


@triton.jit
def _pick_digit(hist, remaining, NUM_BINS: tl.constexpr):
    """The bin holding the `remaining`-th largest key: (bin, keys above it, keys in it)."""
    bins = tl.arange(0, NUM_BINS)
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    digit = tl.max(tl.where(at_or_above >= remaining, bins, -1), 0)
    above = tl.sum(tl.where(bins == digit, at_or_above - hist, 0), 0)
    in_digit = tl.sum(tl.where(bins == digit, hist, 0), 0)
    return digit, above, in_digit


@triton.jit
def _linear_bucket(x, lo, hi, inv_width, NUM_BINS: tl.constexpr):
    """Monotone bucket of x in [lo, hi] split into NUM_BINS equal parts (0 when inv_width = 0)."""
    scaled = (tl.minimum(tl.maximum(x, lo), hi) - lo) * inv_width
    return tl.minimum(scaled.to(tl.int32), NUM_BINS - 1)


@triton.jit
def _radix_select_kernel(
    scores_ptr,  # (R, S) fp32 contiguous, R = B * Hsel
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    idx_ptr,  # (R, K_TOP) int32 contiguous
    S,
    K_TOP,
    SEL_HEADS,
    HAS_SEQLENS: tl.constexpr,
    CHUNK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    LINEAR_FIRST: tl.constexpr,
):
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    NUM_PASSES: tl.constexpr = 32 // RADIX_BITS
    row = tl.program_id(0)
    row_ptr = scores_ptr + row.to(tl.int64) * S
    length = S
    if HAS_SEQLENS:
        length = tl.maximum(tl.minimum(tl.load(seqlens_ptr + row // SEL_HEADS).to(tl.int32), S), 0)
    k = tl.minimum(K_TOP, length)
    offs = tl.arange(0, CHUNK)
    done = k == 0
    remaining = k  # how many keys still to take from the current bucket

    # The order is lexicographic on (linear bucket of the value, fp32 key): the first pass splits
    # [min, max] into equal bins, which spreads the histogram where the fp32 exponent byte would
    # pile most keys into a few bins (and serialise the histogram's shared-memory atomics).
    lo = tl.full([], 0.0, tl.float32)
    hi = tl.full([], 0.0, tl.float32)
    inv_width = tl.full([], 0.0, tl.float32)
    bucket_t = tl.where(done, NUM_BINS, 0)
    if LINEAR_FIRST:
        lo = tl.full([], float("inf"), tl.float32)
        hi = tl.full([], float("-inf"), tl.float32)
        for start in range(0, tl.where(done, 0, length), CHUNK):
            in_row = start + offs < length
            x = tl.load(row_ptr + start + offs, mask=in_row, other=0.0)
            finite = in_row & (x == x) & (tl.abs(x) < float("inf"))
            lo = tl.minimum(lo, tl.min(tl.where(finite, x, float("inf")), 0))
            hi = tl.maximum(hi, tl.max(tl.where(finite, x, float("-inf")), 0))
        spread = hi - lo
        inv_width = tl.where((spread > 0) & (spread < float("inf")), NUM_BINS / spread, 0.0)
        hist = tl.zeros([NUM_BINS], dtype=tl.int32)
        for start in range(0, tl.where(done, 0, length), CHUNK):
            in_row = start + offs < length
            x = tl.load(row_ptr + start + offs, mask=in_row, other=0.0)
            hist += tl.histogram(_linear_bucket(x, lo, hi, inv_width, NUM_BINS), NUM_BINS, in_row)
        digit_t, above, in_digit = _pick_digit(hist, remaining, NUM_BINS)
        bucket_t = tl.where(done, bucket_t, digit_t)
        new_remaining = remaining - above
        remaining = tl.where(done, remaining, new_remaining)
        done = done | (in_digit == new_remaining)

    digit_mask = tl.full([], NUM_BINS - 1, tl.uint32)
    prefix = tl.full([], 0, tl.uint32)  # the top bits of the k-th key found so far
    prefix_mask = tl.full([], 0, tl.uint32)
    for p in tl.static_range(NUM_PASSES):
        shift = 32 - RADIX_BITS * (p + 1)
        hist = tl.zeros([NUM_BINS], dtype=tl.int32)
        end = tl.where(done, 0, length)
        for start in range(0, end, CHUNK):
            in_row = start + offs < end
            x = tl.load(row_ptr + start + offs, mask=in_row, other=0.0)
            key = _float_to_ordered_key(x)
            in_bucket = in_row & ((key & prefix_mask) == prefix)
            if LINEAR_FIRST:
                in_bucket = in_bucket & (_linear_bucket(x, lo, hi, inv_width, NUM_BINS) == bucket_t)
            digit = ((key >> shift) & (NUM_BINS - 1)).to(tl.int32)
            hist += tl.histogram(digit, NUM_BINS, mask=in_bucket)
        digit_t, above, in_digit = _pick_digit(hist, remaining, NUM_BINS)
        # A finished row keeps its state (its pass saw an empty range).
        new_remaining = remaining - above
        prefix = tl.where(done, prefix, prefix | (digit_t.to(tl.uint32) << shift))
        prefix_mask = tl.where(done, prefix_mask, prefix_mask | (digit_mask << shift))
        remaining = tl.where(done, remaining, new_remaining)
        done = done | (in_digit == new_remaining)

    # Compaction: keys above the k-th fill slots [0, k - remaining), ties [k - remaining, k).
    # One scan counts both: strictly-greater in the low 16 bits, ties in the high 16 bits.
    out_ptr = idx_ptr + row.to(tl.int64) * K_TOP
    n_greater = k - remaining
    taken_greater = tl.zeros([], tl.int32)
    taken_equal = tl.zeros([], tl.int32)
    for start in range(0, length, CHUNK):
        in_row = start + offs < length
        x = tl.load(row_ptr + start + offs, mask=in_row, other=0.0)
        bucket = _linear_bucket(x, lo, hi, inv_width, NUM_BINS)
        masked = _float_to_ordered_key(x) & prefix_mask
        same = in_row & (bucket == bucket_t)
        greater = (in_row & (bucket > bucket_t)) | (same & (masked > prefix))
        equal = same & (masked == prefix)
        packed = tl.cumsum(greater.to(tl.int32) + (equal.to(tl.int32) << 16), 0)
        rank_greater = taken_greater + (packed & 0xFFFF) - 1
        rank_equal = taken_equal + (packed >> 16) - 1
        take_equal = equal & (rank_equal < remaining)
        tl.store(out_ptr + rank_greater, start + offs, mask=greater)
        tl.store(out_ptr + n_greater + rank_equal, start + offs, mask=take_equal)
        total = tl.sum(greater.to(tl.int32) + (equal.to(tl.int32) << 16), 0)
        taken_greater += total & 0xFFFF
        taken_equal += total >> 16
    for start in range(k, K_TOP, CHUNK):
        tl.store(out_ptr + start + offs, tl.full([CHUNK], -1, tl.int32), mask=start + offs < K_TOP)


def _select_topk_triton(
    scores: torch.Tensor, k_top: int, seqlens: torch.Tensor | None
) -> torch.Tensor:
    """Launch the radix select. scores (B, Hsel, S) fp32 contiguous -> (B, Hsel, k_top) int32."""
    assert scores.dtype == torch.float32 and scores.is_contiguous() and scores.dim() == 3
    batch, sel_heads, seq = scores.shape
    assert 1 <= k_top <= seq
    idx = torch.empty((batch, sel_heads, k_top), device=scores.device, dtype=torch.int32)
    _radix_select_kernel[(batch * sel_heads,)](
        scores,
        seqlens if seqlens is not None else idx,
        idx,
        seq,
        k_top,
        sel_heads,
        HAS_SEQLENS=seqlens is not None,
        CHUNK=CHUNK,
        RADIX_BITS=RADIX_BITS,
        LINEAR_FIRST=LINEAR_FIRST,
        num_warps=NUM_WARPS,
    )
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
