"""Radix select: the exact top-k of a score row by histogram passes over its key bits.

Up to 32 / `radix_bits` passes of a histogram (`tl.histogram`, 8-bit digits by default) walk the
ordered uint32 key (see select_bisect.py) from its top digit down and pin the k-th largest key T;
a pass is skipped once the boundary bucket is taken whole. A last pass compacts: every key above
T is kept, and keys equal to T are kept in position order until k are chosen. Ties therefore go
to lower positions, and the result is an exact top-k.

`_radix_select_kernel` is also the last launch of the sampled bracket (select_bracket.py): there
it selects among the bracket's candidates only (register bisection up to `cand_bisect_row` of
them, else radix passes), and falls back to the plain radix select of the whole row when the
bracket missed T or overflowed its scratch.

Bytes moved: each pass reads the row (S·4 bytes, mostly from L2 after the first); writes k·4
bytes of int32 positions.
"""

from __future__ import annotations

import triton
import triton.language as tl

from keyspace.kernels.select_bisect import _bisect_row, _float_to_ordered_key, _row_bounds


@triton.jit
def _radix_threshold(
    row_ptr, length, k, CHUNK: tl.constexpr, RADIX_BITS: tl.constexpr, STRIDE: tl.constexpr
):
    """Radix-select the k-th largest of row_ptr[:length * STRIDE:STRIDE] (fp32).

    Returns (prefix, prefix_mask, remaining): the keys whose masked bits are above `prefix` are
    all in the top k, and `remaining` more are taken from those equal to it.
    """
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    offs = tl.arange(0, CHUNK)
    bins = tl.arange(0, NUM_BINS)
    digit_mask = tl.full([], NUM_BINS - 1, tl.uint32)
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
            x = tl.load(row_ptr + (start + offs) * STRIDE, mask=in_row, other=0.0)
            key = _float_to_ordered_key(x)
            in_bucket = in_row & ((key & prefix_mask) == prefix)
            digit = ((key >> shift) & (NUM_BINS - 1)).to(tl.int32)
            hist += tl.histogram(digit, NUM_BINS, mask=in_bucket)
        # The digit is the largest bin whose count of keys at or above it reaches `remaining`.
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        digit_t = tl.max(tl.where(at_or_above >= remaining, bins, -1), 0)
        above = tl.sum(tl.where(bins == digit_t, at_or_above - hist, 0), 0)
        in_digit = tl.sum(tl.where(bins == digit_t, hist, 0), 0)
        # A finished row keeps its state (its pass saw an empty range).
        new_remaining = remaining - above
        prefix = tl.where(done, prefix, prefix | (digit_t.to(tl.uint32) << shift))
        prefix_mask = tl.where(done, prefix_mask, prefix_mask | (digit_mask << shift))
        remaining = tl.where(done, remaining, new_remaining)
        done = done | (in_digit == new_remaining)
    return prefix, prefix_mask, remaining


@triton.jit
def _compact(
    row_ptr,
    pos_ptr,
    length,
    k,
    prefix,
    prefix_mask,
    remaining,
    out_ptr,
    CHUNK: tl.constexpr,
    INDIRECT: tl.constexpr,
    STRIDE: tl.constexpr,
):
    """Write the positions of the top k of row_ptr[:length] to out_ptr[:k], in row order.

    Keys above `prefix` fill slots [0, k - remaining), ties [k - remaining, k). One scan counts
    both kinds: strictly-greater in the low 16 bits, ties in the high 16 bits. With INDIRECT the
    position written is pos_ptr[i] instead of i. Elements (and positions) lie STRIDE apart.
    """
    offs = tl.arange(0, CHUNK)
    n_greater = k - remaining
    taken_greater = tl.zeros([], tl.int32)
    taken_equal = tl.zeros([], tl.int32)
    for start in range(0, tl.where(k > 0, length, 0), CHUNK):
        in_row = start + offs < length
        x = tl.load(row_ptr + (start + offs) * STRIDE, mask=in_row, other=0.0)
        masked = _float_to_ordered_key(x) & prefix_mask
        greater = in_row & (masked > prefix)
        equal = in_row & (masked == prefix)
        flags = greater.to(tl.int32) + (equal.to(tl.int32) << 16)
        packed = tl.cumsum(flags, 0)
        rank_greater = taken_greater + (packed & 0xFFFF) - 1
        rank_equal = taken_equal + (packed >> 16) - 1
        take_equal = equal & (rank_equal < remaining)
        pos = start + offs
        if INDIRECT:
            pos = tl.load(pos_ptr + (start + offs) * STRIDE, mask=in_row, other=0)
        tl.store(out_ptr + rank_greater, pos, mask=greater)
        tl.store(out_ptr + n_greater + rank_equal, pos, mask=take_equal)
        total = tl.sum(flags, 0)
        taken_greater += total & 0xFFFF
        taken_equal += total >> 16


@triton.jit
def _radix_select_kernel(
    scores_ptr,  # (R, S) fp32 contiguous, R = B * Hsel
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    idx_ptr,  # (R, K_TOP) int32 contiguous
    counts_ptr,  # (R, 2) int32 from the bracket pass when SAMPLED, else a dummy
    cand_val_ptr,  # (R, 2 * cand_cap) fp32 view of the pass's packed candidates (odd slots)
    cand_pos_ptr,  # (R, 2 * cand_cap) int32 view of the same (even slots)
    S,
    K_TOP,
    SEL_HEADS,
    cand_cap,
    HAS_SEQLENS: tl.constexpr,
    CHUNK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    SAMPLED: tl.constexpr,
    CAND_CHUNK: tl.constexpr,
    CAND_BISECT: tl.constexpr,
    CAND_ROW: tl.constexpr,
    GUESS_STEPS: tl.constexpr,  # most guessed probes before plain halving; 0: none
    PACKED_COUNTS: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = scores_ptr + row.to(tl.int64) * S
    out_ptr = idx_ptr + row.to(tl.int64) * K_TOP
    length, k = _row_bounds(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS)
    fallback = True
    if SAMPLED:
        if PACKED_COUNTS:
            both = tl.load(counts_ptr + row * 2)
            n_sure = both & 0xFFFF
            n_cand = (both >> 16) & 0xFFFF
        else:
            n_sure = tl.load(counts_ptr + row * 2)
            n_cand = tl.load(counts_ptr + row * 2 + 1)
        if (n_sure <= k) & (n_sure + n_cand >= k) & (n_cand <= cand_cap):
            # The bracket holds the k-th: the top k are the sure ones plus the best candidates.
            fallback = False
            need = k - n_sure
            cand_val = cand_val_ptr + row.to(tl.int64) * cand_cap * 2 + 1  # little-endian
            cand_pos = cand_pos_ptr + row.to(tl.int64) * cand_cap * 2
            if CAND_BISECT & (n_cand <= CAND_ROW):  # the candidates fit in registers
                _bisect_row(
                    cand_val, cand_pos, out_ptr + n_sure, n_cand, need, need, CAND_ROW,
                    CAND_CHUNK, True, GUESS_STEPS, 2,
                )  # fmt: skip
            else:
                prefix, prefix_mask, remaining = _radix_threshold(
                    cand_val, n_cand, need, CAND_CHUNK, RADIX_BITS, 2
                )
                _compact(
                    cand_val, cand_pos, n_cand, need, prefix, prefix_mask, remaining,
                    out_ptr + n_sure, CAND_CHUNK, True, 2,
                )  # fmt: skip
    if fallback:
        prefix, prefix_mask, remaining = _radix_threshold(row_ptr, length, k, CHUNK, RADIX_BITS, 1)
        _compact(
            row_ptr, row_ptr, length, k, prefix, prefix_mask, remaining, out_ptr, CHUNK, False, 1
        )
    offs_fill = tl.arange(0, CHUNK)
    for start in range(k, K_TOP, CHUNK):
        tl.store(out_ptr + start + offs_fill, -1, mask=start + offs_fill < K_TOP)
