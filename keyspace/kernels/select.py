"""Exact top-k selection over fp32 score rows: the public `select_topk`, its dispatch and its
torch reference. The kernels live in one file per algorithm:

- select_bisect.py, register bisection (rows up to `bisect_auto_max`): the whole row in
  registers, searched for the k-th largest key; reads the row once.
- select_radix.py, radix select: histogram passes over the key bits, then a compaction pass;
  reads the row 2-5 times, mostly from L2.
- select_bracket.py, sampled bracket (long rows on CUDA): a sample's histogram brackets the k-th
  and one pass over the row keeps the candidates, among which select_radix.py's kernel selects.

`KernelSettings.select_method` picks one ("auto": by row length, `_select_method`). In each, one
program owns one score row (one query head, or one KV group with group_select); each fp32 score
is compared as a uint32 key whose unsigned order is the float order, so the result is an exact
top-k. Ties with the k-th score go to the lowest positions, except on the sampled path, where
the index order is not kept and which of several exactly tied scores is kept is unspecified.

Slots past min(k, seqlens[b]) hold -1. Indices are unordered; attention does not care.

Bytes moved: the bisection reads the row once (S·4 bytes); each radix pass reads it again
(mostly from L2 after the first); the sampled path reads it about twice. Writes Hsel·k·4 bytes of
int32 indices.
"""

from __future__ import annotations

import torch
import triton

from keyspace.kernels._checks import check_k_top, use_triton
from keyspace.kernels.select_bisect import _bisect_select_kernel, bisect_warps
from keyspace.kernels.select_bracket import (
    PACKED_COUNTS_BELOW,
    _bracket_kernel,
    _bracket_pass_kernel,
    _bracket_sample,
)
from keyspace.kernels.select_radix import _radix_select_kernel
from keyspace.kernels.settings import BISECT_MAX_ROW, DEFAULT_SETTINGS, KernelSettings


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
