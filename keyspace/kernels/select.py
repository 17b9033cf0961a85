"""Exact top-k selection over the fp32 score bits.

Each fp32 score is mapped to a uint32 key whose unsigned order is the float order. Three exact
methods; `KernelSettings.select_method` picks one ("auto": by row length). In each, one program
owns one score row (one query head, or one KV group with group_select).

Register bisection (rows up to `bisect_auto_max`): the program loads its whole row into registers
once and searches the key range for the k-th largest key T: each probe counts the keys at or
above a threshold with one block-wide sum, and the search stops as soon as a threshold has
exactly k keys at or above it. With `bisect_guess` the first probes are guessed (the row's normal
quantile, then regula falsi on the counts; about 5 probes on bell-shaped scores, see
_guided_search), and once the bracket is one key from the k-th, one max (or min) and one count
pin it (_peel); plain halving of the [min, max] key range finishes (at most 32 halvings). One
packed scan over the same registers then compacts. Nothing is re-read per probe.

Radix select: up to 32 / `radix_bits` passes of a histogram (`tl.histogram`, 8-bit digits by
default) walk the key from its top digit down and pin the k-th largest key T; a pass is skipped
once the boundary bucket is taken whole. A last pass compacts: every key above T is kept, and
keys equal to T are kept in position order until k are chosen. Ties therefore go to lower
positions, and the result is an exact top-k.

Sampled bracket (long rows on CUDA): a first launch bins an even sample of `bracket_sample`
scores per row into a histogram (a larger sample where the bracket would hold too many
candidates, _bracket_sample); two of its quantiles, a few standard deviations of the sample rank
either side of the k-th, bracket T. A second launch walks the rows tile by tile over the whole
GPU: every score above the bracket goes straight to the output, those inside it go with their
positions to a scratch buffer (tiles take their ranges with atomic counters). A third selects
among the candidates only (register bisection up to `cand_bisect_row` of them, else radix
passes). If the bracket missed T (or held more than `cand_cap` candidates), the row falls back to
the plain radix select, so the result is exact either way; which of several exactly tied scores
is kept is unspecified here.

Slots past min(k, seqlens[b]) hold -1. Indices are unordered; attention does not care.

Bytes moved: the bisection reads the row once (S·4 bytes); each radix pass reads it again
(mostly from L2 after the first); the sampled path reads it about twice. Writes Hsel·k·4 bytes of
int32 indices.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from keyspace.kernels._checks import check_k_top, use_triton
from keyspace.kernels.settings import BISECT_MAX_ROW, DEFAULT_SETTINGS, KernelSettings

# Rows shorter than this count sure scores and candidates in one atomic (16 bits each).
PACKED_COUNTS_BELOW = 1 << 16


@triton.jit
def _float_to_ordered_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits >> 31
    return tl.where(sign == 1, ~bits, bits | 0x80000000)


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
def _row_bounds(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS: tl.constexpr):
    """(valid length, keys to keep) of one score row."""
    length = S
    if HAS_SEQLENS:
        length = tl.maximum(tl.minimum(tl.load(seqlens_ptr + row // SEL_HEADS).to(tl.int32), S), 0)
    return length, tl.minimum(K_TOP, length)


@triton.jit
def _bracket_kernel(
    scores_ptr,  # (R, S) fp32 contiguous
    seqlens_ptr,  # (B,) int, or a dummy
    bracket_ptr,  # (R, 2) fp32 out: lo, hi
    counts_ptr,  # (R, 2) int32 out: zeroed counters (sure, candidates) for the next launch
    S,
    K_TOP,
    SEL_HEADS,
    HAS_SEQLENS: tl.constexpr,
    SAMPLE: tl.constexpr,
    BINS: tl.constexpr,
):
    """Bracket the k-th score between two sample quantiles, about four standard deviations of the
    sample rank either side of rank k; above `hi` a score is in the top k for sure.

    The quantiles come from a histogram of an even sample of the row. The sample's bins (BINS,
    even over the sample's range clipped to mean ± 8 sd) are a monotone function of the score,
    so the bin holding sample rank r bounds the rank-r score: `hi` is the upper edge of the bin
    of rank hi_rank (at most hi_rank sample scores lie above it, up to the edge's rounding), `lo`
    the lower edge of the bin of rank lo_rank (at least lo_rank + 1 lie at or above it). The
    edges cost no pass over the sample; a bracket that rounding or the sample gets wrong costs
    only its row a fallback, never exactness.
    """
    row = tl.program_id(0)
    length, k = _row_bounds(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS)
    i = tl.arange(0, SAMPLE)
    sample = tl.load(scores_ptr + row.to(tl.int64) * S + (i.to(tl.int64) * length) // SAMPLE)
    mean = tl.sum(sample, 0) / SAMPLE
    dev = sample - mean
    sd = tl.sqrt(tl.sum(dev * dev, 0) / SAMPLE)  # two passes: rows like 1e3 ± 1e-3 stay resolved
    smin = tl.min(sample, 0)
    smax = tl.max(sample, 0)
    low = tl.maximum(smin, mean - 8.0 * sd)
    high = tl.minimum(smax, mean + 8.0 * sd)
    scale = BINS / tl.maximum(high - low, 1e-30)
    pos = tl.minimum(tl.maximum((sample - low) * scale, 0.0), BINS - 1.0)  # monotone in the score
    bins = pos.to(tl.int32)
    hist = tl.histogram(bins, BINS)
    upto = tl.cumsum(hist, 0)  # sample scores in bins <= j
    rank = (k.to(tl.float32) * SAMPLE) / tl.maximum(length, 1)
    margin = 4.0 * tl.sqrt(rank * (1.0 - rank / SAMPLE)) + 8.0  # as bracket_ranks
    hi_rank = (rank - margin).to(tl.int32)
    lo_rank = (rank + margin).to(tl.int32)
    # bin of descending rank r: the first j with (sample scores in bins > j) <= r
    j_hi = tl.sum((SAMPLE - upto > hi_rank).to(tl.int32), 0)
    j_lo = tl.sum((SAMPLE - upto > lo_rank).to(tl.int32), 0)
    # The end bins reach the sample's extremes, past the clipped range.
    hi = tl.where(j_hi >= BINS - 1, smax, low + (j_hi + 1).to(tl.float32) / scale)
    lo = tl.where(j_lo <= 0, smin, low + j_lo.to(tl.float32) / scale)
    tl.store(bracket_ptr + row * 2, tl.where(lo_rank >= SAMPLE, float("-inf"), lo))
    tl.store(bracket_ptr + row * 2 + 1, tl.where(hi_rank < 0, float("inf"), hi))
    tl.store(counts_ptr + row * 2 + tl.arange(0, 2), tl.zeros([2], tl.int32))


@triton.jit
def _bracket_pass_kernel(
    scores_ptr,  # (R, S) fp32 contiguous
    seqlens_ptr,  # (B,) int, or a dummy
    bracket_ptr,  # (R, 2) fp32: lo, hi
    counts_ptr,  # (R, 2) int32: sure, candidates (atomic); packed in [R, 0] with PACKED_COUNTS
    idx_ptr,  # (R, K_TOP) int32: sure positions go straight here
    cand_ptr,  # (R, cand_cap) int64: a candidate's fp32 bits (high half) and position (low)
    S,
    K_TOP,
    SEL_HEADS,
    cand_cap,
    HAS_SEQLENS: tl.constexpr,
    TILE: tl.constexpr,
    PACKED_COUNTS: tl.constexpr,
):
    """One tile of a row: scores above `hi` to the output, those in [lo, hi] to the scratch.
    Tiles take their output ranges with atomic counters, so the row order is not kept. A
    candidate's value and position go out as one 8-byte store."""
    row = tl.program_id(0)
    length, k = _row_bounds(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS)
    lo = tl.load(bracket_ptr + row * 2)
    hi = tl.load(bracket_ptr + row * 2 + 1)
    offs = tl.program_id(1) * TILE + tl.arange(0, TILE)
    in_row = offs < length
    x = tl.load(scores_ptr + row.to(tl.int64) * S + offs, mask=in_row, other=0.0)
    sure = in_row & (x > hi)
    cand = in_row & (x >= lo) & (x <= hi)
    flags = sure.to(tl.int32) + (cand.to(tl.int32) << 16)  # two counts in one scan
    packed = tl.cumsum(flags, 0)
    total = tl.sum(flags, 0)
    if PACKED_COUNTS:  # rows shorter than 2**16: both counters in one word, one atomic
        base = tl.atomic_add(counts_ptr + row * 2, total, sem="relaxed")
        base_sure = base & 0xFFFF
        base_cand = (base >> 16) & 0xFFFF
    else:
        base_sure = tl.atomic_add(counts_ptr + row * 2, total & 0xFFFF, sem="relaxed")
        base_cand = tl.atomic_add(counts_ptr + row * 2 + 1, total >> 16, sem="relaxed")
    rank_sure = base_sure + (packed & 0xFFFF) - 1
    rank_cand = base_cand + (packed >> 16) - 1
    tl.store(idx_ptr + row.to(tl.int64) * K_TOP + rank_sure, offs, mask=sure & (rank_sure < k))
    keep = cand & (rank_cand < cand_cap)
    word = (x.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs.to(tl.int64)
    tl.store(cand_ptr + row.to(tl.int64) * cand_cap + rank_cand, word, mask=keep)


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


@triton.jit
def _key_to_float(key):
    """Inverse of _float_to_ordered_key for an int64 key (0 and 2**32 come back as NaN)."""
    u = key.to(tl.uint32)
    bits = tl.where(u >= 0x80000000, u ^ 0x80000000, ~u).to(tl.uint32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _guided_search(x, key, in_row, length, k, lo, hi, c_hi, found, MAX_STEPS: tl.constexpr):
    """Narrow the bracket [lo, hi) of the k-th largest key with guessed thresholds.

    The first probe is the row's normal quantile (mean + z·sd); until both ends of the bracket
    are probed, Newton steps with the normal density (widened 4x per one-sided step); then
    Illinois regula falsi on the counts in value space, with a value-space bisection after any
    step that fails to halve the count span. Every probe is clamped strictly inside the bracket,
    so the invariant count(key >= lo) >= k > count(key >= hi) = c_hi holds and the caller's plain
    bisection finishes whatever MAX_STEPS leaves. On scores like q·k (bell-shaped), about 5
    probes instead of about 18 halvings.
    """
    n = tl.maximum(length, 1).to(tl.float32)
    xs = tl.where(in_row, x, 0.0)
    mean = tl.sum(xs, 0) / n
    sd = tl.sqrt(tl.maximum(tl.sum(xs * xs, 0) / n - mean * mean, 0.0))
    p = tl.minimum(tl.maximum((k.to(tl.float32) + 0.5) / n, 1e-6), 1.0 - 1e-6)
    r = tl.sqrt(-2.0 * tl.log(tl.minimum(p, 1.0 - p)))
    # Upper-tail normal quantile (Abramowitz & Stegun 26.2.23, error < 5e-4).
    z = r - (2.515517 + r * (0.802853 + r * 0.010328)) / (
        1.0 + r * (1.432788 + r * (0.189269 + r * 0.001308))
    )
    z = tl.where(p < 0.5, z, -z)
    t = mean + sd * z
    dens = n * tl.exp(-0.5 * z * z) * 0.3989422804014327 / tl.maximum(sd, 1e-30)
    c_lo = length
    lo_probed = k < 0  # False, as a scalar
    hi_probed = k < 0
    bis = tl.zeros([], tl.int32)
    last = tl.zeros([], tl.int32)
    w_lo = tl.full([], 1.0, tl.float32)
    w_hi = tl.full([], 1.0, tl.float32)
    steps = tl.zeros([], tl.int32)
    near = k < 0  # the bracket is one key from the k-th: finished below by one peel
    while (hi - lo > 1) & (found == 0) & (steps < MAX_STEPS) & (near == 0):
        v_lo = _key_to_float(lo)
        v_hi = _key_to_float(hi)
        t = tl.where((bis != 0) | (t != t), 0.5 * v_lo + 0.5 * v_hi, t)
        mid = _float_to_ordered_key(t).to(tl.int64)
        mid = tl.where((t != t) | (mid <= lo) | (mid >= hi), (lo + hi) // 2, mid)
        c = tl.sum((key >= mid.to(tl.uint32)).to(tl.int32), 0)
        span = c_lo - c_hi
        at_least = c >= k
        # Illinois: an end kept twice in a row has its weight halved.
        w_hi = tl.where(at_least & (last == 1), w_hi * 0.5, 1.0)
        w_lo = tl.where((c < k) & (last == -1), w_lo * 0.5, 1.0)
        last = tl.where(at_least, 1, -1)
        lo = tl.where(at_least, mid, lo)
        c_lo = tl.where(at_least, c, c_lo)
        hi = tl.where(at_least, hi, mid)
        c_hi = tl.where(at_least, c_hi, c)
        lo_probed = lo_probed | at_least
        hi_probed = hi_probed | (c < k)
        found = c == k
        steps += 1
        both = lo_probed & hi_probed
        bis = tl.where(both & (bis == 0) & (2 * (c_lo - c_hi) > span), 1, 0)
        v_lo = _key_to_float(lo)
        v_hi = _key_to_float(hi)
        g_lo = ((c_lo - k).to(tl.float32) - 0.5) * w_lo
        g_hi = ((c_hi - k).to(tl.float32) - 0.5) * w_hi
        dens = tl.where(both | (steps == 1), dens, dens * 0.25)
        newton = _key_to_float(mid) + ((c - k).to(tl.float32) - 0.5) / dens
        t = tl.where(both, v_lo + (v_hi - v_lo) * (g_lo / (g_lo - g_hi)), newton)
        near = both & ((k - c_hi == 1) | (c_lo - k == 1))
    if near & (found == 0) & (hi - lo > 1):
        lo, hi, c_hi, found = _peel(key, in_row, k, lo, hi, c_hi)
    return lo, hi, c_hi, found


@triton.jit
def _peel(key, in_row, k, lo, hi, c_hi):
    """End the search when the bracket [lo, hi) is one key from the k-th largest: c_hi = k - 1
    keys are at or above hi (the k-th is the largest key in the bracket), or k + 1 are at or
    above lo (the k-th is just above the smallest). Regula falsi crawls here, since the two
    neighbouring order statistics can be far closer than the bracket is wide. One max or min and
    one count pin the k-th exactly; returns (lo, hi, c_hi, found) with hi = lo + 1 or found.
    """
    in_bracket = in_row & (key >= lo.to(tl.uint32)) & (key <= (hi - 1).to(tl.uint32))
    if k - c_hi == 1:
        # The bracket's largest key t: count(key >= t) >= k, and no key lies in (t, hi).
        t = tl.max(tl.where(in_bracket, key, 0), 0).to(tl.int64)
        c = tl.sum((in_row & (key >= t.to(tl.uint32))).to(tl.int32), 0)
        lo_new = t
        hi_new = t + 1
        c_hi_new = c_hi
    else:
        # The bracket's smallest key t: count(key >= t + 1) is k (found) or below k (T = t).
        t = tl.min(tl.where(in_bracket, key, 0xFFFFFFFF), 0).to(tl.int64)
        above = t + 1
        c = tl.sum((in_row & (key >= tl.minimum(above, 0xFFFFFFFF).to(tl.uint32))).to(tl.int32), 0)
        c = tl.where(above > 0xFFFFFFFF, 0, c)
        lo_new = tl.where(c == k, above, t)
        hi_new = above
        c_hi_new = tl.where(c == k, c_hi, c)
    return lo_new, hi_new, c_hi_new, c == k


@triton.jit
def _bisect_row(
    row_ptr, pos_ptr, out_ptr, length, k, K_TOP,
    ROW: tl.constexpr, CHUNK: tl.constexpr, INDIRECT: tl.constexpr, GUESS_STEPS: tl.constexpr,
    STRIDE: tl.constexpr,
):  # fmt: skip
    """Write the top k of row_ptr[:length] (fp32, ROW >= length) to out_ptr[:k], -1 up to K_TOP.

    The whole row is read into registers once; the bisection then needs no memory traffic. With
    INDIRECT the position written for element i is pos_ptr[i] instead of i. Elements (and
    positions) lie STRIDE apart.
    """
    offs = tl.arange(0, ROW)
    in_row = offs < length
    x = tl.load(row_ptr + offs * STRIDE, mask=in_row, other=0.0)
    key = _float_to_ordered_key(x)
    # Keys outside the row become 0, which no midpoint (always >= 1) counts.
    key = tl.where(in_row, key, 0)
    # Invariant: count(key >= lo) >= k > count(key >= hi) = c_hi.
    lo = tl.min(tl.where(in_row, key, 0xFFFFFFFF), 0).to(tl.int64)
    hi = tl.max(key, 0).to(tl.int64) + 1
    c_hi = tl.zeros([], tl.int32)
    # k >= length keeps the whole row: every key is above lo - 1.
    found = (k <= 0) | ((k >= length) & (lo >= 1))
    if GUESS_STEPS > 0:
        lo, hi, c_hi, found = _guided_search(
            x, key, in_row, length, k, lo, hi, c_hi, found, GUESS_STEPS
        )
    while (hi - lo > 1) & (found == 0):
        mid = (lo + hi) // 2
        c = tl.sum((key >= mid.to(tl.uint32)).to(tl.int32), 0)
        at_least = c >= k
        lo = tl.where(at_least, mid, lo)
        hi = tl.where(at_least, hi, mid)
        c_hi = tl.where(at_least, c_hi, c)
        found = c == k
    # Found: exactly k keys are >= lo, i.e. > lo - 1, and no ties are needed. Otherwise lo is the
    # k-th largest key T: the c_hi keys above it are kept, and k - c_hi of those equal to it.
    prefix = tl.where(found, lo - 1, lo).to(tl.uint32)
    remaining = tl.where(found, 0, k - c_hi)
    # Compaction from the same registers, one scan over the whole row: keys above the prefix fill
    # slots [0, k - remaining), ties [k - remaining, k) in position order. Both counts share one
    # int32 (greater in the low 16 bits, ties in the high 16; ROW <= 32768 keeps them apart).
    greater = in_row & (key > prefix)
    equal = in_row & (key == prefix)
    packed = tl.cumsum(greater.to(tl.int32) + (equal.to(tl.int32) << 16), 0)
    rank_greater = (packed & 0xFFFF) - 1
    rank_equal = ((packed >> 16) & 0xFFFF) - 1
    pos = offs
    if INDIRECT:
        pos = tl.load(pos_ptr + offs * STRIDE, mask=in_row, other=0)
    tl.store(out_ptr + rank_greater, pos, mask=greater)
    take_equal = equal & (rank_equal < remaining)
    tl.store(out_ptr + (k - remaining) + rank_equal, pos, mask=take_equal)
    offs_fill = tl.arange(0, CHUNK)
    for start in range(k, K_TOP, CHUNK):
        tl.store(out_ptr + start + offs_fill, -1, mask=start + offs_fill < K_TOP)


@triton.jit
def _bisect_select_kernel(
    scores_ptr,  # (R, S) fp32 contiguous, R = B * Hsel
    seqlens_ptr,  # (B,) int, or a dummy when HAS_SEQLENS is False
    idx_ptr,  # (R, K_TOP) int32 contiguous
    S,
    K_TOP,
    SEL_HEADS,
    HAS_SEQLENS: tl.constexpr,
    ROW: tl.constexpr,  # next power of two >= S: the whole row sits in registers
    CHUNK: tl.constexpr,
    GUESS_STEPS: tl.constexpr,  # most guessed probes before plain halving; 0: none
):
    row = tl.program_id(0)
    length, k = _row_bounds(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS)
    row_ptr = scores_ptr + row.to(tl.int64) * S
    out_ptr = idx_ptr + row.to(tl.int64) * K_TOP
    _bisect_row(row_ptr, row_ptr, out_ptr, length, k, K_TOP, ROW, CHUNK, False, GUESS_STEPS, 1)


def bisect_warps(seq: int, settings: KernelSettings) -> int:
    """Warps of a register-bisection program: about `bisect_elems_per_thread` scores a thread
    (`bisect_elems_short` for rows up to `bisect_short_row`), at least 4 warps."""
    row = triton.next_power_of_2(seq)
    short = row <= settings.bisect_short_row
    elems = settings.bisect_elems_short if short else settings.bisect_elems_per_thread
    return min(settings.bisect_max_warps, max(4, row // (32 * elems)))


def bracket_ranks(rank: float, sample: int) -> tuple[int, int]:
    """Sample ranks (hi_rank, lo_rank) that bracket sample rank `rank`: 4 sd of it, plus 8."""
    margin = 4.0 * math.sqrt(max(rank * (1.0 - rank / sample), 0.0)) + 8.0
    return int(rank - margin), int(rank + margin)


def expected_candidates(seq: int, k_top: int, sample: int, per_bin: int) -> float:
    """Scores of a row of `seq` inside the bracket of a `sample`-score histogram (`per_bin`
    sample scores a bin), about: the bracket's sample ranks, plus one bin's worth at either end."""
    hi_rank, lo_rank = bracket_ranks(k_top * sample / seq, sample)
    return seq * (lo_rank - hi_rank + 2 * per_bin) / sample


def _bracket_sample(seq: int, k_top: int, settings: KernelSettings) -> int:
    """The bracket's sample size: doubled until the expected candidates fit the register row
    (with 25% to spare), then further only while they would overflow the scratch; past that a
    larger sample costs more than radix passes over a long candidate list."""

    def over(sample: int, limit: int) -> bool:
        expected = expected_candidates(seq, k_top, sample, settings.bracket_sample_per_bin)
        return 1.25 * expected > limit

    sample = settings.bracket_sample
    while sample < settings.bracket_sample_row_max and over(sample, settings.cand_bisect_row):
        sample *= 2
    while sample < settings.bracket_sample_max and over(sample, min(settings.cand_cap, seq)):
        sample *= 2
    return sample


def _select_method(seq: int, on_cuda: bool, settings: KernelSettings) -> str:
    method = settings.select_method
    if method == "bisect" and seq > BISECT_MAX_ROW:
        return "radix"  # the row would not fit the packed compaction scan
    if method == "sampled" and seq < settings.sampled_min_len:
        return "radix"
    if method != "auto":
        return method
    if seq <= settings.bisect_auto_max:
        return "bisect"
    return "sampled" if on_cuda else "radix"  # the interpreter's sort is slow; tests force it


def _select_topk_triton(
    scores: torch.Tensor,
    k_top: int,
    seqlens: torch.Tensor | None,
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Launch the select. scores (B, Hsel, S) fp32 contiguous -> (B, Hsel, k_top) int32."""
    assert scores.dtype == torch.float32 and scores.is_contiguous() and scores.dim() == 3
    batch, sel_heads, seq = scores.shape
    assert 1 <= k_top <= seq
    idx = torch.empty((batch, sel_heads, k_top), device=scores.device, dtype=torch.int32)
    method = _select_method(seq, scores.is_cuda, settings)
    rows = batch * sel_heads
    lens = seqlens if seqlens is not None else idx
    guess_steps = settings.bisect_guess_steps if settings.bisect_guess else 0
    chunk = settings.radix_chunk
    if method == "bisect":
        row = triton.next_power_of_2(seq)
        _bisect_select_kernel[(rows,)](
            scores, lens, idx, seq, k_top, sel_heads, HAS_SEQLENS=seqlens is not None,
            ROW=row, CHUNK=min(chunk, row), GUESS_STEPS=guess_steps,
            num_warps=bisect_warps(seq, settings),
        )  # fmt: skip
        return idx
    sampled = method == "sampled"
    packed = seq < PACKED_COUNTS_BELOW  # the pass's two row counters fit 16 bits each
    cand_cap = min(settings.cand_cap, seq) if sampled else 1
    cand = torch.empty((rows, cand_cap), device=scores.device, dtype=torch.int64)
    counts = torch.empty((rows, 2), device=scores.device, dtype=torch.int32)
    if sampled:
        bracket = torch.empty((rows, 2), device=scores.device)
        sample = _bracket_sample(seq, k_top, settings)
        _bracket_kernel[(rows,)](
            scores, lens, bracket, counts, seq, k_top, sel_heads,
            HAS_SEQLENS=seqlens is not None, SAMPLE=sample,
            BINS=sample // settings.bracket_sample_per_bin, num_warps=settings.bracket_warps,
        )  # fmt: skip
        tile = settings.bracket_tile
        _bracket_pass_kernel[(rows, triton.cdiv(seq, tile))](
            scores, lens, bracket, counts, idx, cand, seq, k_top, sel_heads,
            cand_cap, HAS_SEQLENS=seqlens is not None, TILE=tile, PACKED_COUNTS=packed,
            num_warps=settings.bracket_pass_warps,
        )  # fmt: skip
    cand_row = triton.next_power_of_2(min(cand_cap, settings.cand_bisect_row))
    _radix_select_kernel[(rows,)](
        scores, lens, idx, counts, cand.view(torch.float32), cand.view(torch.int32), seq, k_top,
        sel_heads, cand_cap,
        HAS_SEQLENS=seqlens is not None, CHUNK=chunk, RADIX_BITS=settings.radix_bits,
        SAMPLED=sampled, CAND_CHUNK=settings.cand_chunk,
        CAND_BISECT=sampled and settings.cand_bisect, CAND_ROW=cand_row,
        GUESS_STEPS=guess_steps, PACKED_COUNTS=packed,
        num_warps=settings.cand_warps if sampled else settings.radix_warps,
    )  # fmt: skip
    return idx


def select_topk(
    scores: torch.Tensor,
    k_top: int,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> torch.Tensor:
    """Exact top-k positions of each score row.

    Args:
        scores: (batch, heads, seq) float32, e.g. from `lowrank_scores`.
        k_top: positions kept per row, in [1, seq].
        seqlens: (batch,) valid length per sequence; positions past it are never chosen.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        settings: the Triton launch parameters (`KernelSettings`), e.g. `select_method`.

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
    return _select_topk_triton(scores.float().contiguous(), k_top, seqlens, settings)


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
