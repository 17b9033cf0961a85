"""Sampled bracket: two launches that narrow a long row to the candidates for its k-th score.

A first launch bins an even sample of `bracket_sample` scores per row into a histogram (a larger
sample where the bracket would hold too many candidates, _bracket_sample); two of its quantiles,
a few standard deviations of the sample rank either side of the k-th, bracket T. A second launch
walks the rows tile by tile over the whole GPU: every score above the bracket goes straight to
the output, those inside it go with their positions to a scratch buffer (tiles take their ranges
with atomic counters). select_radix.py's `_radix_select_kernel` then selects among the
candidates, or falls back to the plain radix select if the bracket missed T (or held more than
`cand_cap` candidates), so the result is exact either way; which of several exactly tied scores
is kept is unspecified here.

Bytes moved: the sample (a few KB a row), then one pass over the row (S·4 bytes) plus the
candidates' 8-byte words.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from keyspace.kernels.select_bisect import _row_bounds
from keyspace.kernels.settings import KernelSettings

# Rows shorter than this count sure scores and candidates in one atomic (16 bits each).
PACKED_COUNTS_BELOW = 1 << 16


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
