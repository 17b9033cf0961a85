"""Loki decode kernels against fp32 oracles, on CPU through the Triton interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported; `backend="triton"` forces
the Triton kernels on CPU tensors. Shapes are a representative cross-product of issue 5's grid,
kept small where the grid does not ask for size, because the interpreter is slow.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import replace
from pathlib import Path

import hypothesis
import pytest
import torch
import triton
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import keyspace.kernels.attention as attention_module
import keyspace.kernels.decode as decode_module
import keyspace.kernels.scores as scores_module
import keyspace.kernels.select as select_module
import keyspace.kernels.select_bracket as bracket_module
from keyspace.kernels import (
    DEFAULT_SETTINGS,
    KernelSettings,
    dense_attention_reference,
    loki_decode,
    loki_decode_reference,
    lowrank_scores,
    lowrank_scores_reference,
    select_topk,
    select_topk_reference,
    sparse_attention,
    sparse_attention_reference,
)

# assert_close tolerances against the fp32 oracle, per input dtype.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
SCORE_TOL = {"atol": 1e-4, "rtol": 1e-5}  # fp32 accumulation of products, any input dtype


def make_cache(batch, q_heads, kv_heads, seq, head_dim, d, dtype=torch.float32, seed=0):
    """Random (never zero) q, k_low, k_rest, v plus the full keys, in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    keys = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype)
    return q, keys[..., :d].contiguous(), keys[..., d:].contiguous(), v, keys


def assert_valid_topk(scores, idx, k_top, seqlens=None):
    """idx holds, per row, min(k_top, length) distinct positions whose scores are a top set."""
    batch, heads, seq = scores.shape
    for b in range(batch):
        length = seq if seqlens is None else int(seqlens[b])
        want = min(k_top, length)
        for h in range(heads):
            chosen = idx[b, h][idx[b, h] >= 0].long()
            assert chosen.numel() == want and chosen.unique().numel() == want
            assert int(chosen.max()) < length
            if want < length:
                mask = torch.ones(length, dtype=torch.bool)
                mask[chosen] = False
                row = scores[b, h, :length].double()
                assert row[chosen].min() >= row[mask].max()


# (batch, q_heads, kv_heads, seq, head_dim, d): MHA and GQA groups 1, 3, 4, 8; D 64 and 128;
# d in {1, 16, 32, D-1, D}; S in {1, 17, 1027, 4096}.
DENSE_CASES = [
    (2, 4, 4, 17, 64, 16),
    (1, 6, 2, 1027, 64, 1),
    (1, 8, 2, 4096, 128, 32),
    (1, 8, 1, 1027, 128, 127),
    (1, 2, 2, 1, 64, 64),
    (2, 3, 1, 17, 128, 128),
    (1, 4, 1, 1027, 64, 63),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "B{}Hq{}Hkv{}S{}D{}d{}".format(*c))
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_k_top_equal_to_seq_is_dense_attention(case, group_select):
    batch, q_heads, kv_heads, seq, head_dim, d = case
    q, k_low, k_rest, v, keys = make_cache(*case)
    oracle = dense_attention_reference(q, keys, v)
    out = loki_decode(q, k_low, k_rest, v, seq, group_select=group_select, backend="triton")
    torch.testing.assert_close(out, oracle, **TOL[torch.float32])
    ref = loki_decode_reference(q, k_low, k_rest, v, seq, group_select=group_select)
    torch.testing.assert_close(ref, oracle, **TOL[torch.float32])


SPARSE_CASES = [  # (batch, q_heads, kv_heads, seq, head_dim, d, k_top)
    (2, 4, 4, 1027, 64, 16, 1),
    (1, 6, 2, 1027, 128, 32, 7),
    (1, 8, 2, 4096, 128, 32, 512),
    (1, 8, 1, 4096, 64, 16, 7),
    (2, 3, 1, 17, 64, 1, 7),
    (1, 4, 4, 1027, 128, 127, 100),
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: "B{}Hq{}Hkv{}S{}D{}d{}k{}".format(*c))
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_sparse_decode_matches_reference(case, group_select):
    *shape, k_top = case
    q, k_low, k_rest, v, _ = make_cache(*shape, seed=1)
    out = loki_decode(q, k_low, k_rest, v, k_top, group_select=group_select, backend="triton")
    ref = loki_decode_reference(q, k_low, k_rest, v, k_top, group_select=group_select)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# bf16 is not covered here: the Triton interpreter (numpy) has no bfloat16 and returns garbage for
# bf16 tl.dot. The GPU check in benchmarks/bench_decode.py covers bf16 against the fp32 oracle.
@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_half_precision_against_fp32_oracle(dtype, group_select):
    q, k_low, k_rest, v, _ = make_cache(2, 8, 2, 1027, 128, 32, dtype=dtype, seed=2)
    k_top = 129
    out = loki_decode(q, k_low, k_rest, v, k_top, group_select=group_select, backend="triton")
    assert out.dtype == dtype
    # The oracle attends, in fp32, to the set the kernels chose; the choice is checked apart.
    scores = lowrank_scores(q, k_low, group_select, backend="triton")
    torch.testing.assert_close(
        scores, lowrank_scores_reference(q, k_low, group_select), **SCORE_TOL
    )
    idx = select_topk(scores, k_top, backend="triton")
    assert_valid_topk(lowrank_scores_reference(q, k_low, group_select), idx, k_top)
    up = [t.float() for t in (q, k_low, k_rest, v)]
    oracle = sparse_attention_reference(*up, idx)
    torch.testing.assert_close(out.float(), oracle, **TOL[dtype])


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_ragged_seqlens(group_select):
    q, k_low, k_rest, v, keys = make_cache(3, 6, 2, 1027, 64, 16, seed=3)
    seqlens = torch.tensor([1027, 5, 1])
    out = loki_decode(q, k_low, k_rest, v, 7, group_select=group_select, seqlens=seqlens,
                      backend="triton")  # fmt: skip
    ref = loki_decode_reference(q, k_low, k_rest, v, 7, group_select=group_select, seqlens=seqlens)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # Sequences no longer than k_top keep every valid token: dense attention over their length.
    dense = dense_attention_reference(q, keys, v, seqlens=seqlens)
    torch.testing.assert_close(out[1:], dense[1:], **TOL[torch.float32])
    full = loki_decode(q, k_low, k_rest, v, 1027, group_select=group_select, seqlens=seqlens,
                       backend="triton")  # fmt: skip
    torch.testing.assert_close(full, dense, **TOL[torch.float32])


@pytest.mark.parametrize("tile_major", [True, False], ids=["tile_major", "row_major"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("kv_heads", [2, 8], ids=["gqa", "mha"])  # a tl.dot, or one GEMV row
def test_lowrank_scores_read_the_first_d_dims_and_mask_past_seqlens(
    group_select, kv_heads, tile_major
):
    # Both grid orders: tiles fastest, or (batch, KV head) rows fastest (past the grid-y limit).
    grid = replace(DEFAULT_SETTINGS, scores_tile_major=tile_major)
    q, k_low, _, _, _ = make_cache(2, 8, kv_heads, 300, 64, 16, seed=4)
    seqlens = torch.tensor([300, 123])
    out = lowrank_scores(q, k_low, group_select, seqlens, backend="triton", settings=grid)
    ref = lowrank_scores_reference(q, k_low, group_select, seqlens)
    assert out.shape == (2, kv_heads if group_select else 8, 300) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **SCORE_TOL)
    assert torch.isinf(out[1, :, 123:]).all() and torch.isfinite(out[1, :, :123]).all()


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_score_pass_zeroes_the_attention_split_counters(group_select):
    # The decode step gives the attention counters that only the score pass zeroes (no memset):
    # start them at garbage, and the stages must still merge every split of every index set.
    q, k_low, k_rest, v, _ = make_cache(2, 8, 2, 700, 64, 16, seed=13)
    three_splits = replace(DEFAULT_SETTINGS, attention_splits=3)  # merges on the counter
    sets = 2 * (2 if group_select else 8)
    counters = torch.full((sets,), 7, dtype=torch.int32)
    scores = scores_module._lowrank_scores_triton(q, k_low, group_select, None, counters)
    assert (counters == 0).all()
    idx = select_module._select_topk_triton(scores, 300, None)
    counters.fill_(5)  # as the score pass left them for a step that had garbage
    scores_module._lowrank_scores_triton(q, k_low, group_select, None, counters)
    out = attention_module._sparse_attention_triton(
        q, k_low, k_rest, v, idx, 1 / math.sqrt(64), counter=counters, settings=three_splits
    )
    ref = loki_decode_reference(q, k_low, k_rest, v, 300, group_select=group_select)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    out = loki_decode(q, k_low, k_rest, v, 300, group_select=group_select, backend="triton",
                      settings=three_splits)  # fmt: skip
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_per_head_score_tile_fits_shared_memory_at_wide_d():
    # The dot path stages a BLOCK_S x BLOCK_D tile: d = 256 in fp32 (256 KB at 256 tokens) failed
    # on the H100 (227 KB of shared memory per block); the tile now shrinks to fit.
    tile = scores_module.score_tile
    for block_d in (16, 32, 64, 128, 256):
        for elem_size in (2, 4):
            rows = tile(block_d, elem_size, False, DEFAULT_SETTINGS)
            assert rows * block_d * elem_size <= DEFAULT_SETTINGS.scores_dot_tile_bytes
            assert rows >= 16 and rows & (rows - 1) == 0
    assert tile(256, 4, False, DEFAULT_SETTINGS) == 128
    assert tile(256, 4, True, DEFAULT_SETTINGS) == DEFAULT_SETTINGS.scores_block_s
    q, k_low, _, _, _ = make_cache(1, 8, 2, 300, 256, 256, seed=12)  # 128-token tiles, 3 of them
    torch.testing.assert_close(
        lowrank_scores(q, k_low, backend="triton"), lowrank_scores_reference(q, k_low), **SCORE_TOL
    )


@pytest.mark.parametrize("impl", ["sampled", "sampled_radix", "radix", "bisect", "bisect_plain"])
@pytest.mark.parametrize(
    "kind,seq,k_top",
    [("randn", 4096, 512), ("randn", 1027, 1), ("ties", 1027, 7), ("ties", 2500, 600),
     ("constant", 2100, 17), ("randn", 17, 17), ("randn", 2048, 1), ("cauchy", 3000, 375),
     ("outliers", 2048, 256), ("narrow", 1500, 700), ("exponential", 1027, 300),
     ("tied_kth2", 2048, 300), ("tied_kth3", 2048, 300)],
)  # fmt: skip
def test_select_topk_is_an_exact_top_k(impl, kind, seq, k_top):
    # sampled_radix: the sampled bracket with radix passes (not bisection) over its candidates.
    # bisect_plain: the register bisection without the guessed probes (_guided_search).
    method = KernelSettings(
        select_method=impl.split("_")[0],
        cand_bisect=impl != "sampled_radix",
        bisect_guess=impl != "bisect_plain",
        bracket_sample=256,  # a wider bracket: more candidates
    )
    gen = torch.Generator().manual_seed(5)
    if kind == "ties":  # few distinct values: the k-th is tied many times over
        scores = torch.randint(-4, 4, (2, 3, seq), generator=gen).float()
    elif kind == "constant":
        scores = torch.full((2, 3, seq), 0.5)
    elif kind == "cauchy":  # heavy tails: the mean and spread guess the k-th badly
        scores = torch.randn(2, 3, seq, generator=gen) / torch.randn(2, 3, seq, generator=gen)
    elif kind == "outliers":  # a few huge scores, like attention sinks
        scores = torch.randn(2, 3, seq, generator=gen)
        scores[..., ::37] = 1e4 + torch.rand(2, 3, len(range(0, seq, 37)), generator=gen)
    elif kind == "narrow":  # every score within a few ulps of 1e3 (ties included)
        scores = 1e3 + torch.randint(0, 64, (2, 3, seq), generator=gen).float() * 6.1e-5
    elif kind == "exponential":
        scores = torch.empty(2, 3, seq).exponential_(generator=gen) * 50
    elif kind.startswith("tied_kth"):  # the k-th largest tied with the next 1 or 2 only
        scores = torch.randn(2, 3, seq, generator=gen)
        order = scores.argsort(-1, descending=True)
        kth = scores.gather(-1, order[..., k_top - 1 : k_top])
        tied = order[..., k_top : k_top + int(kind[-1]) - 1]
        scores.scatter_(-1, tied, kth.expand_as(tied))
    else:
        scores = torch.randn(2, 3, seq, generator=gen)
    seqlens = torch.tensor([seq, max(1, seq // 3)])
    for lens in (None, seqlens):
        idx = select_topk(scores, k_top, lens, backend="triton", settings=method)
        assert idx.shape == (2, 3, k_top) and idx.dtype == torch.int32
        assert_valid_topk(scores, idx, k_top, lens)
    if kind in ("randn", "cauchy", "exponential"):  # no ties: the very same set as torch.topk
        got = idx.sort(-1).values
        want = select_topk_reference(scores, k_top, seqlens).sort(-1).values
        torch.testing.assert_close(got, want)


def test_select_topk_handles_infinities():
    scores = torch.randn(1, 2, 3000, generator=torch.Generator().manual_seed(6))
    scores[..., ::3] = float("-inf")
    scores[..., 1] = float("inf")
    for impl in ("sampled", "radix", "bisect"):
        method = KernelSettings(select_method=impl, bracket_sample=256)
        idx = select_topk(scores, 1500, backend="triton", settings=method)
        assert_valid_topk(scores.nan_to_num(posinf=1e30, neginf=-1e30), idx, 1500)


@pytest.mark.parametrize("fused_reduce", [True, False], ids=["fused_reduce", "reduce_launch"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_sparse_attention_split_k_and_unused_slots(group_select, fused_reduce):
    q, k_low, k_rest, v, _ = make_cache(2, 8, 2, 700, 128, 32, seed=7)
    sets = 2 if group_select else 8
    gen = torch.Generator().manual_seed(8)
    idx = torch.stack([torch.randperm(700, generator=gen)[:300] for _ in range(2 * sets)])
    idx = idx.reshape(2, sets, 300).int()
    idx[0, 0, 250:] = -1  # a short row
    idx[1, -1, :] = -1  # a row with nothing selected: zeros
    ref = sparse_attention_reference(q, k_low, k_rest, v, idx)
    for splits in (1, 3, 5):
        split = replace(
            DEFAULT_SETTINGS, attention_fuse_reduce=fused_reduce, attention_splits=splits
        )
        out = attention_module._sparse_attention_triton(
            q, k_low, k_rest, v, idx, 1 / math.sqrt(128), settings=split
        )
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
    given = torch.full_like(q, float("nan"))  # written in place (the pipelined step's halves)
    split = replace(DEFAULT_SETTINGS, attention_fuse_reduce=fused_reduce, attention_splits=3)
    into = attention_module._sparse_attention_triton(
        q, k_low, k_rest, v, idx, 1 / math.sqrt(128), out=given, settings=split
    )
    assert into is given
    torch.testing.assert_close(given, ref, **TOL[torch.float32])
    heads = slice(4, 8) if group_select else slice(7, 8)  # the query heads of the empty row
    assert (out[1, heads] == 0).all()
    torch.testing.assert_close(sparse_attention(q, k_low, k_rest, v, idx, backend="triton"), ref,
                               **TOL[torch.float32])  # fmt: skip
    if not group_select:  # the score pass's q_low·k_low instead of k_low: the same attention
        low = lowrank_scores_reference(q, k_low)
        out = sparse_attention(q, k_low, k_rest, v, idx, backend="triton", low_scores=low)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="low_scores"):
        sparse_attention(q, k_low, k_rest, v, idx, low_scores=torch.zeros(2, 8, 5))


class CopyWatch(TorchFunctionMode):
    """Records the torch calls that copy one of `watched` whole into new memory (a
    `.contiguous()`, `.clone()`, `.to()` ...), by the name of the call."""

    def __init__(self, *watched: torch.Tensor):
        super().__init__()
        self.watched, self.copies = watched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if isinstance(out, torch.Tensor) and any(source is w for w in self.watched):
            storage = out.untyped_storage().data_ptr()
            if out.numel() == source.numel() and storage != source.untyped_storage().data_ptr():
                self.copies.append(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_strided_cache_views_are_read_in_place(group_select):
    """k_rest as keys[..., d:], v inside one per-token [k_rest | v] buffer, k_low as a slice of a
    longer preallocated buffer: same result as contiguous copies, and nothing copies the views
    on their way to the kernels."""
    q, k_low, k_rest, v, keys = make_cache(2, 8, 2, 300, 64, 16, seed=11)
    packed = torch.cat([v, k_rest], dim=-1)  # per token: v then k_rest
    v_view, rest_view = packed[..., :64], packed[..., 64:]
    assert not rest_view.is_contiguous() and not keys[..., 16:].is_contiguous()
    ref = loki_decode_reference(q, k_low, k_rest, v, 40, group_select=group_select)
    for rest_arg, v_arg in ((keys[..., 16:], v), (rest_view, v_view)):
        with CopyWatch(rest_arg, v_arg) as watch:
            out = loki_decode(q, k_low, rest_arg, v_arg, 40, group_select=group_select,
                              backend="triton")  # fmt: skip
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        assert watch.copies == []
    # k_low as the first 300 tokens of a preallocated 337-token buffer: read in place as well.
    buffer = torch.zeros(2, 2, 337, 16)
    buffer[:, :, :300] = k_low
    low_view = buffer[:, :, :300]
    assert not low_view.is_contiguous()
    with CopyWatch(low_view, rest_view, v_view) as watch:
        out = loki_decode(q, low_view, rest_view, v_view, 40, group_select=group_select,
                          backend="triton")  # fmt: skip
        scores = lowrank_scores(q, low_view, group_select, backend="triton")
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert watch.copies == []
    torch.testing.assert_close(scores, lowrank_scores_reference(q, k_low, group_select),
                               **SCORE_TOL)  # fmt: skip
    # The watch sees a copy where one is due: k_low whose (seq, d) rows are not one block.
    low_strided = keys[..., :16]
    with CopyWatch(low_strided) as watch:
        lowrank_scores(q, low_strided, group_select, backend="triton")
    assert watch.copies == ["contiguous"]
    idx = select_topk_reference(lowrank_scores_reference(q, k_low, group_select), 40)
    out = sparse_attention(q, k_low, rest_view, v_view, idx, backend="triton")
    torch.testing.assert_close(out, sparse_attention_reference(q, k_low, k_rest, v, idx),
                               **TOL[torch.float32])  # fmt: skip


def test_cpu_dispatch_runs_the_reference_and_scale_is_used():
    q, k_low, k_rest, v, _ = make_cache(1, 4, 2, 64, 64, 16, seed=9)
    out = loki_decode(q, k_low, k_rest, v, 8, scale=0.3)
    assert torch.equal(out, loki_decode_reference(q, k_low, k_rest, v, 8, scale=0.3))
    forced = loki_decode(q, k_low, k_rest, v, 8, scale=0.3, backend="triton")
    torch.testing.assert_close(forced, out, **TOL[torch.float32])
    assert not torch.allclose(out, loki_decode_reference(q, k_low, k_rest, v, 8))


@hypothesis.settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4]),
    seq=st.integers(1, 300),
    head_dim=st.sampled_from([16, 64]),
    d_frac=st.floats(0.0, 1.0),
    k_frac=st.floats(0.0, 1.0),
    group_select=st.booleans(),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(
    batch, kv_heads, group, seq, head_dim, d_frac, k_frac, group_select, ragged, seed
):
    d = max(1, round(d_frac * head_dim))
    k_top = max(1, round(k_frac * seq))
    q, k_low, k_rest, v, _ = make_cache(batch, kv_heads * group, kv_heads, seq, head_dim, d,
                                        seed=seed)  # fmt: skip
    seqlens = None
    if ragged:
        seqlens = torch.randint(1, seq + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    scores = lowrank_scores_reference(q, k_low, group_select, seqlens)
    idx = select_topk(
        lowrank_scores(q, k_low, group_select, seqlens, backend="triton"), k_top, seqlens,
        backend="triton",
    )  # fmt: skip
    assert_valid_topk(scores, idx, k_top, seqlens)
    out = loki_decode(q, k_low, k_rest, v, k_top, group_select=group_select, seqlens=seqlens,
                      backend="triton")  # fmt: skip
    torch.testing.assert_close(out, sparse_attention_reference(q, k_low, k_rest, v, idx),
                               **TOL[torch.float32])  # fmt: skip


def _args(**changes):
    q, k_low, k_rest, v, _ = make_cache(2, 4, 2, 32, 64, 16)
    args = {"q": q, "k_low": k_low, "k_rest": k_rest, "v": v, "k_top": 4}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"k_top": 33}, r"k_top must be in \[1, S=32\]"),
        ({"k_top": 0}, r"k_top must be in \[1, S=32\]"),
        ({"k_rest": torch.randn(2, 2, 32, 40)}, "shape mismatch: k_rest"),
        ({"v": torch.randn(2, 2, 31, 64)}, "shape mismatch: v"),
        ({"q": torch.randn(3, 4, 64)}, "shape mismatch: q has batch 3"),
        ({"k_low": torch.randn(2, 2, 32, 65)}, "d > D"),
        ({"q": torch.randn(2, 3, 64)}, "not a multiple of Hkv=2"),
        ({"q": torch.randn(2, 4, 64, dtype=torch.float64)}, "float16, bfloat16 or float32"),
        ({"v": torch.randn(2, 2, 32, 64).half()}, "dtype mismatch"),
        ({"seqlens": torch.tensor([32, 0])}, r"seqlens must lie in \[1, S=32\]"),
        ({"seqlens": torch.tensor([32])}, r"seqlens must have shape \(2,\)"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_arguments_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        loki_decode(**_args(**changes))


def test_stage_functions_validate_too():
    q, k_low, k_rest, v, _ = make_cache(1, 4, 2, 32, 64, 16)
    with pytest.raises(ValueError, match="k_top"):
        select_topk(torch.randn(1, 4, 32), 40)
    with pytest.raises(ValueError, match="idx must be"):
        sparse_attention(q, k_low, k_rest, v, torch.zeros(1, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="not a multiple"):
        lowrank_scores(torch.randn(1, 3, 64), k_low)


def test_bench_table_and_config_checks():
    from keyspace.bench.kernels import TABLE_COLUMNS, BenchConfig, markdown_table

    row = {key: 1.0 for _, key, _ in TABLE_COLUMNS} | {"select": "group", "kv_heads": 8}
    table = markdown_table([row]).splitlines()
    assert len(table) == 3 and table[2].count("|") == len(TABLE_COLUMNS) + 1
    with pytest.raises(ValueError, match="k fraction"):
        BenchConfig(points=((32, 0.0),))
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="int8")


def test_sampled_select_falls_back_when_the_bracket_overflows():
    # cand_cap=16: every bracket holds more candidates, so every row falls back.
    overflow = KernelSettings(select_method="sampled", cand_cap=16, bracket_sample=256)
    scores = torch.randn(2, 2, 3000, generator=torch.Generator().manual_seed(10))
    idx = select_topk(scores, 300, backend="triton", settings=overflow)
    assert_valid_topk(scores, idx, 300)


@pytest.mark.parametrize("packed", [True, False], ids=["one_atomic", "two_atomics"])
def test_bracket_pass_counts_and_stores_sure_scores_and_candidates(packed):
    # The pass on its own: a wrong count or word would otherwise only send rows to the fallback,
    # which keeps the selection exact and hides it.
    seq, k_top, rows, cap = 5000, 600, 3, 1024
    scores = torch.randn(rows, seq, generator=torch.Generator().manual_seed(13))
    bracket = torch.tensor([[0.9, 1.3], [1.0, 1.1], [-0.2, 0.4]])  # lo, hi per row
    counts = torch.zeros(rows, 2, dtype=torch.int32)
    idx = torch.full((rows, k_top), -7, dtype=torch.int32)
    cand = torch.zeros(rows, cap, dtype=torch.int64)
    bracket_module._bracket_pass_kernel[(rows, triton.cdiv(seq, 1024))](
        scores, counts, bracket, counts, idx, cand, seq, k_top, 1, cap, HAS_SEQLENS=False,
        TILE=1024, PACKED_COUNTS=packed, num_warps=4,
    )  # fmt: skip
    for row in range(rows):
        x, (lo, hi) = scores[row], bracket[row].tolist()
        sure = (x > hi).nonzero().flatten()
        inside = ((x >= lo) & (x <= hi)).nonzero().flatten()
        if packed:
            n_sure, n_cand = int(counts[row, 0]) & 0xFFFF, int(counts[row, 0]) >> 16
        else:
            n_sure, n_cand = counts[row].tolist()
        assert (n_sure, n_cand) == (len(sure), len(inside))
        kept = min(n_sure, k_top)  # the output has room for k_top sure positions
        assert set(idx[row, :kept].tolist()) <= set(sure.tolist())
        assert len(set(idx[row, :kept].tolist())) == kept
        words = cand[row, : min(n_cand, cap)]
        positions = (words & 0xFFFFFFFF).to(torch.int32)
        values = (words >> 32).to(torch.int32).view(torch.float32)
        assert len(set(positions.tolist())) == min(n_cand, cap)  # every slot, none twice
        assert set(positions.tolist()) <= set(inside.tolist())
        torch.testing.assert_close(values, x[positions.long()], rtol=0, atol=0)


def test_sampled_select_takes_radix_passes_over_a_long_candidate_list():
    # More candidates than the register row holds: radix passes over the candidates, not the
    # register bisection (which would drop every candidate past cand_bisect_row).
    short_row = KernelSettings(select_method="sampled", cand_bisect_row=16, bracket_sample=256)
    scores = torch.randn(2, 2, 3000, generator=torch.Generator().manual_seed(12))
    idx = select_topk(scores, 300, backend="triton", settings=short_row)
    torch.testing.assert_close(
        idx.sort(-1).values, select_topk_reference(scores, 300).sort(-1).values
    )


@pytest.mark.parametrize("seq,k_top", [(8192, 1024), (8192, 2048), (4000, 1000), (3000, 7)])
def test_sampled_bracket_holds_the_kth_and_is_narrow(seq, k_top):
    """The histogram bracket against the sorted sample it stands for, and its width on the row."""
    gen = torch.Generator().manual_seed(seq + k_top)
    scores = torch.randn(3, seq, generator=gen) * torch.tensor([[1.0], [30.0], [1e-3]])
    sample, per_bin = DEFAULT_SETTINGS.bracket_sample, DEFAULT_SETTINGS.bracket_sample_per_bin
    bins = sample // per_bin
    bracket = torch.empty(3, 2)
    counts = torch.full((3, 2), 7, dtype=torch.int32)
    bracket_module._bracket_kernel[(3,)](
        scores, counts, bracket, counts, seq, k_top, 3, HAS_SEQLENS=False, SAMPLE=sample,
        BINS=bins, num_warps=4,
    )  # fmt: skip
    assert counts.eq(0).all()  # the next launch's counters start at zero
    hi_rank, lo_rank = bracket_module.bracket_ranks(k_top * sample / seq, sample)
    drawn = scores[:, torch.arange(sample) * seq // sample]
    for row in range(3):
        lo, hi = bracket[row].tolist()
        x, s = scores[row], drawn[row]
        if hi_rank >= 0:
            assert (s > hi).sum() <= hi_rank  # at most hi_rank sample scores above hi
        else:
            assert hi == float("inf")
        if lo_rank < sample:
            assert (s >= lo).sum() >= lo_rank + 1
        else:
            assert lo == float("-inf")
        sure, cand = (x > hi).sum().item(), ((x >= lo) & (x <= hi)).sum().item()
        assert sure <= k_top <= sure + cand  # the row's k-th lies inside
        # About as wide as the sample ranks it stands for, plus a bin at either end.
        assert cand <= 1.25 * bracket_module.expected_candidates(seq, k_top, sample, per_bin)


def test_bracket_sample_grows_until_the_candidates_fit():
    tuned = DEFAULT_SETTINGS
    per_bin, first = tuned.bracket_sample_per_bin, tuned.bracket_sample

    def sample(seq, k_top):
        return bracket_module._bracket_sample(seq, k_top, tuned)

    def expected(seq, k_top, n):
        return bracket_module.expected_candidates(seq, k_top, n, per_bin)

    row, cap = tuned.cand_bisect_row, tuned.cand_cap
    assert sample(32768, 4096) == first  # k = S/8: about 2400 candidates
    assert sample(32768, 16384) == 2 * first  # k = S/2: 3400 at 2048, 2300 at 4096
    assert sample(131072, 16384) == 4096  # 6400 candidates: radix passes, not a sample of 8192
    assert sample(131072, 32768) == 8192  # 10000 at 4096 would overflow the scratch
    for seq, k_top in (
        (32768, 16384),
        (65536, 8192),
        (131072, 16384),
        (131072, 32768),
        (20000, 19999),
    ):
        n = sample(seq, k_top)
        fits_row = 1.25 * expected(seq, k_top, n) <= row
        fits_cap = 1.25 * expected(seq, k_top, n) <= min(cap, seq)
        assert fits_row or n >= tuned.bracket_sample_row_max
        assert fits_cap or n == tuned.bracket_sample_max
        if n > first:  # the next smaller sample would not have fitted
            smaller = 1.25 * expected(seq, k_top, n // 2)
            assert smaller > (row if n <= tuned.bracket_sample_row_max else min(cap, seq))


def test_sampled_select_at_the_default_sample_size():
    sampled = replace(DEFAULT_SETTINGS, select_method="sampled")
    scores = torch.randn(1, 1, 8192, generator=torch.Generator().manual_seed(11))
    idx = select_topk(scores, 1024, backend="triton", settings=sampled)
    assert_valid_topk(scores, idx, 1024)


@pytest.mark.parametrize("seq", [1, 2, 5, 300, 8192, 32768])
def test_bisect_select_edges(seq):
    """Register bisection: tiny rows, k in {1, S}, -0.0 vs 0.0, a row of equal extremes."""
    bisect = replace(DEFAULT_SETTINGS, select_method="bisect")
    gen = torch.Generator().manual_seed(seq)
    scores = torch.randn(2, 2, seq, generator=gen)
    scores[0, 1] = float("-inf")  # every key the lowest finite-or-not value
    if seq > 2:
        scores[1, 0, : seq // 2] = -0.0
        scores[1, 0, seq // 2 :] = 0.0
    for k_top in sorted({1, max(1, seq // 2), seq}):
        for lens in (None, torch.tensor([seq, max(1, seq - 1)])):
            idx = select_topk(scores, k_top, lens, backend="triton", settings=bisect)
            assert_valid_topk(scores.nan_to_num(neginf=-1e30), idx, k_top, lens)


def test_select_method_choice():
    def method(seq, on_cuda, tuned=DEFAULT_SETTINGS):
        return select_module._select_method(seq, on_cuda, tuned)

    assert method(4096, True) == "bisect"
    assert method(16384, False) == "bisect"
    assert method(32768, True) == "sampled"
    assert method(65536, True) == "sampled"
    assert method(65536, False) == "radix"
    bisect = replace(DEFAULT_SETTINGS, select_method="bisect")
    assert method(32768, True, bisect) == "bisect"
    assert method(65536, True, bisect) == "radix"
    with pytest.raises(ValueError, match="select_method"):
        replace(DEFAULT_SETTINGS, select_method="heap")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"select_method": "heap"}, "select_method must be one of"),
        ({"pipeline": "sometimes"}, "pipeline must be one of"),
        ({"attention_block_n": 48}, "attention_block_n must be a power of two"),
        ({"attention_block_n": 8}, "attention_block_n must be at least 16"),
        ({"scores_num_warps": 0}, "scores_num_warps must be positive"),
        ({"attention_splits": -1}, "attention_splits must be positive"),
        ({"radix_bits": 3}, "radix_bits must be 1, 2, 4 or 8"),
        ({"radix_chunk": 1 << 16}, "radix_chunk must be below"),
        ({"bisect_auto_max": 65536}, "bisect_auto_max must be <="),
        ({"bracket_sample": 8192, "bracket_sample_row_max": 4096}, "bracket_sample <="),
        ({"cand_bisect": 1}, "cand_bisect must be bool"),
        ({"cand_cap": 8.0}, "cand_cap must be int"),
    ],
)
def test_kernel_settings_validate(change, message):
    with pytest.raises(ValueError, match=message):
        replace(DEFAULT_SETTINGS, **change)


def _documented_defaults() -> dict[str, str]:
    """docs/kernels.md's tuning table: {field: its default as written}."""
    text = (Path(__file__).parents[1] / "docs" / "kernels.md").read_text()
    table = text.split("| fields | default | stage |", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for line in table.splitlines()[2:]:
        names_cell, values_cell = line.split("|")[1:3]
        names = re.findall(r"`(\w+)`", names_cell)
        values = [v.strip() for v in values_cell.split(",")]
        assert len(names) == len(values), line
        documented.update(zip(names, values, strict=True))
    return documented


def _as_written(name: str, value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value // 1024} KB" if name.endswith("_bytes") else str(value)


def test_kernel_settings_defaults_are_the_documented_tuned_values_and_frozen():
    documented = _documented_defaults()
    declared = {f.name: f.default for f in dataclasses.fields(KernelSettings)}
    assert set(documented) == set(declared), "every field is in docs/kernels.md's table, once"
    for name, default in declared.items():
        assert documented[name] == _as_written(name, default), name
        assert getattr(DEFAULT_SETTINGS, name) == default, name
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_SETTINGS.select_method = "radix"


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_pipelined_step_splits_the_batch_in_halves(group_select):
    # The two-stream step runs under CUDA-graph capture; pipeline="always" reaches it here, where
    # the halves run in turn through the same split: batch and seqlens halves, one shared `out`,
    # each half's split counters. Batch 3 makes the halves unequal (1 and 2).
    q, k_low, k_rest, v, _ = make_cache(3, 8, 2, 700, 64, 16, seed=14)
    halves = replace(DEFAULT_SETTINGS, pipeline="always", pipeline_min_sets=2, attention_splits=3)
    assert decode_module._pipelined(q, k_low, group_select, halves)
    assert not decode_module._pipelined(q, k_low, group_select, DEFAULT_SETTINGS)
    assert not decode_module._pipelined(q[:1], k_low[:1], group_select, halves)
    for seqlens in (None, torch.tensor([700, 37, 400])):
        out = loki_decode(q, k_low, k_rest, v, 50, group_select=group_select, seqlens=seqlens,
                          backend="triton", settings=halves)  # fmt: skip
        ref = loki_decode_reference(q, k_low, k_rest, v, 50, group_select=group_select,
                                    seqlens=seqlens)  # fmt: skip
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_bench_top_k_check_accepts_ties_and_rejects_a_wrong_set():
    """The GPU benchmark's selection check (pure torch, so it runs here too)."""
    from keyspace.bench.kernel_checks import _assert_top_k

    gen = torch.Generator().manual_seed(12)
    scores = torch.randn(2, 3, 500, generator=gen)
    scores[0, 0, 10] = scores[0, 0, 20] = 9.0  # two exactly tied scores, the 2 largest
    lens = torch.tensor([500, 40])
    masked = scores.masked_fill(torch.arange(500)[None, None, :] >= lens[:, None, None], -1e30)
    idx = masked.topk(60, dim=-1).indices.int()
    idx[1, :, 40:] = -1  # the short sequence keeps its 40 positions
    _assert_top_k(scores, idx, 60, lens, "topk")
    tied = masked.topk(1, dim=-1).indices.int()
    tied[0, 0, 0] = 20 if int(tied[0, 0, 0]) == 10 else 10  # the other of the tie: still a top-1
    _assert_top_k(scores, tied, 1, lens, "tie")
    wrong = idx.clone()
    wrong[0, 1, 0] = int(masked[0, 1].argmin())  # the smallest score instead of a chosen one
    with pytest.raises(AssertionError, match="not a top-k"):
        _assert_top_k(scores, wrong, 60, lens, "wrong")
    past = idx.clone()
    past[1, 2, 0] = 45  # past the sequence's length (the count of positions stays 40)
    with pytest.raises(AssertionError, match="past the sequence"):
        _assert_top_k(scores, past, 60, lens, "past")
