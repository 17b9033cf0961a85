"""Register bisection: the exact top-k of a score row held whole in registers.

Each fp32 score is mapped to a uint32 key whose unsigned order is the float order
(`_float_to_ordered_key`, shared with the radix and bracket selects). One program owns one score
row (rows up to `bisect_auto_max`, at most BISECT_MAX_ROW): it loads the whole row once and
searches the key range for the k-th largest key T. Each probe counts the keys at or above a
threshold with one block-wide sum, and the search stops as soon as a threshold has exactly k keys
at or above it. With `bisect_guess` the first probes are guessed (the row's normal quantile, then
regula falsi on the counts; about 5 probes on bell-shaped scores, see _guided_search), and once
the bracket is one key from the k-th, one max (or min) and one count pin it (_peel); plain
halving of the [min, max] key range finishes (at most 32 halvings). One packed scan over the same
registers then compacts: keys above T, then ties with T in position order. Nothing is re-read per
probe.

Bytes moved: reads the row once (S·4 bytes); writes k·4 bytes of int32 positions.
"""

from __future__ import annotations

import triton
import triton.language as tl

from keyspace.kernels.settings import KernelSettings


@triton.jit
def _float_to_ordered_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits >> 31
    return tl.where(sign == 1, ~bits, bits | 0x80000000)


@triton.jit
def _key_to_float(key):
    """Inverse of _float_to_ordered_key for an int64 key (0 and 2**32 come back as NaN)."""
    u = key.to(tl.uint32)
    bits = tl.where(u >= 0x80000000, u ^ 0x80000000, ~u).to(tl.uint32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _row_bounds(seqlens_ptr, row, S, K_TOP, SEL_HEADS, HAS_SEQLENS: tl.constexpr):
    """(valid length, keys to keep) of one score row."""
    length = S
    if HAS_SEQLENS:
        length = tl.maximum(tl.minimum(tl.load(seqlens_ptr + row // SEL_HEADS).to(tl.int32), S), 0)
    return length, tl.minimum(K_TOP, length)


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
