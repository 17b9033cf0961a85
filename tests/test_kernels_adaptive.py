"""Adaptive Loki kernels (coordinates chosen per step) against torch references and an fp64 oracle,
on CPU through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1;
`backend="triton"` forces the kernels on CPU tensors). Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

from dataclasses import replace

import hypothesis
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from keyspace.kernels import (
    DEFAULT_SETTINGS,
    adaptive_coords,
    adaptive_decode,
    adaptive_decode_reference,
    adaptive_scores,
    adaptive_scores_reference,
    dense_attention_reference,
    lowrank_scores,
    lowrank_scores_reference,
)
from keyspace.kernels.adaptive import _adaptive_fused_triton

SCORE_TOL = {"atol": 1e-4, "rtol": 1e-5}  # fp32 accumulation of products, any input dtype
# Against the fp64 oracle, per input dtype (the inputs are rounded to it first).
ORACLE_TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-5}, torch.float16: {"atol": 2e-3, "rtol": 0}}
OUT_TOL = {"atol": 1e-5, "rtol": 1e-4}  # fp32 attention outputs


def make_store(batch, q_heads, kv_heads, seq, head_dim, d_max, dtype=torch.float32, seed=0):
    """Random q, full rotated keys, v, and the coordinate-major store of the first d_max."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    keys = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype)
    k_low_t = keys[..., :d_max].transpose(-1, -2).contiguous()  # [B, Hkv, d_max, S]
    return q, keys, v, k_low_t


def oracle_scores(q, keys, coords, group_select, seqlens):
    """fp64, head by head from the row-major keys: an independent route to the scores."""
    batch, q_heads, _ = q.shape
    kv_heads, seq = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, seq, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            cols = coords[b, h // group].long()
            out[b, h] = keys[b, h // group][:, cols].double() @ q[b, h, cols].double()
    if group_select:
        out = out.reshape(batch, kv_heads, group, seq).sum(2)
    if seqlens is not None:
        past_end = torch.arange(seq)[None, :] >= seqlens[:, None]
        out = out.masked_fill(past_end[:, None, :], float("-inf"))
    return out


# (batch, q_heads, kv_heads, seq, head_dim, d_max): MHA and GQA groups 1 and 4, D 64 and 128.
CASES = [(2, 4, 4, 1027, 64, 16), (1, 8, 2, 1027, 128, 32)]


@pytest.mark.parametrize("case", CASES, ids=["mha_D64", "gqa4_D128"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("r_of", ["one", "d_max"])
def test_adaptive_scores_match_reference_and_fp64_oracle(case, group_select, r_of):
    batch, hq, hkv, seq, dim, d_max = case
    q, keys, _, k_low_t = make_store(batch, hq, hkv, seq, dim, d_max, seed=1)
    r = 1 if r_of == "one" else d_max
    coords = adaptive_coords(q, r, hkv, d_max)
    seqlens = torch.tensor([seq, 500][:batch]) if batch > 1 else torch.tensor([700])
    out = adaptive_scores(q, k_low_t, coords, group_select, seqlens, backend="triton")
    assert out.shape == (batch, hkv if group_select else hq, seq) and out.dtype == torch.float32
    ref = adaptive_scores_reference(q, k_low_t, coords, group_select, seqlens)
    torch.testing.assert_close(out, ref, **SCORE_TOL)
    oracle = oracle_scores(q, keys, coords, group_select, seqlens)
    torch.testing.assert_close(out.double(), oracle, **ORACLE_TOL[torch.float32])


def test_half_precision_scores_against_fp64_oracle():
    q, keys, _, k_low_t = make_store(1, 8, 2, 300, 64, 32, dtype=torch.float16, seed=2)
    coords = adaptive_coords(q, 20, 2, 32)
    for group_select in (False, True):
        out = adaptive_scores(q, k_low_t, coords, group_select, backend="triton")
        oracle = oracle_scores(q, keys, coords, group_select, None)
        torch.testing.assert_close(out.double(), oracle, **ORACLE_TOL[torch.float16])


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_coords_arange_reproduce_fixed_d_scores(group_select):
    q, keys, _, k_low_t = make_store(2, 8, 2, 1027, 64, 64, seed=3)
    d = 24
    coords = torch.arange(d, dtype=torch.int32).expand(2, 2, d).contiguous()
    seqlens = torch.tensor([1027, 400])
    out = adaptive_scores(q, k_low_t, coords, group_select, seqlens, backend="triton")
    k_low = keys[..., :d].contiguous()
    fixed = lowrank_scores_reference(q, k_low, group_select, seqlens)
    torch.testing.assert_close(out, fixed, **SCORE_TOL)
    triton_fixed = lowrank_scores(q, k_low, group_select, seqlens, backend="triton")
    torch.testing.assert_close(out, triton_fixed, **SCORE_TOL)


def test_adaptive_coords_pick_the_largest_group_weights():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 8, 64, generator=gen)
    sigma = torch.rand(2, 32, generator=gen) + 0.1
    for scale in (None, sigma):
        coords = adaptive_coords(q, 5, 2, 32, scale)
        assert coords.shape == (3, 2, 5) and coords.dtype == torch.int32
        for b in range(3):
            for g in range(2):
                weight = [
                    sum(abs(float(q[b, h, j])) for h in range(4 * g, 4 * g + 4))
                    * (1.0 if scale is None else float(sigma[g, j]))
                    for j in range(32)
                ]
                best = sorted(range(32), key=lambda j: -weight[j])[:5]
                assert coords[b, g].tolist() == sorted(best)
    full = adaptive_coords(q, 32, 2, 32)
    assert torch.equal(full, torch.arange(32, dtype=torch.int32).expand(3, 2, 32))


def test_adaptive_coords_are_shared_by_the_group_and_follow_sigma():
    q = torch.zeros(1, 4, 8)
    q[0, 1, 6] = 5.0  # one head of KV group 0 leans on coordinate 6
    q[0, 2, 2] = 1.0  # group 1: coordinate 2, unless sigma favours 7
    q[0, 3, 7] = 0.5
    assert adaptive_coords(q, 1, 2, 8).flatten().tolist() == [6, 2]
    sigma = torch.ones(2, 8)
    sigma[1, 7] = 4.0
    assert adaptive_coords(q, 1, 2, 8, sigma).flatten().tolist() == [6, 7]


@pytest.mark.parametrize(
    "case", [(2, 4, 4, 259, 64), (2, 8, 2, 130, 128)], ids=["mha_D64", "gqa4_D128"]
)
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_adaptive_decode_at_r_D_and_k_S_is_dense_attention(case, group_select):
    batch, hq, hkv, seq, dim = case
    q, keys, v, k_low_t = make_store(batch, hq, hkv, seq, dim, dim, seed=5)
    seqlens = torch.tensor([seq, seq // 3])
    out = adaptive_decode(q, k_low_t, keys, v, dim, seq, group_select=group_select,
                          seqlens=seqlens, backend="triton")  # fmt: skip
    torch.testing.assert_close(out, dense_attention_reference(q, keys, v, None, seqlens), **OUT_TOL)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_sparse_adaptive_decode_matches_reference(group_select):
    q, keys, v, k_low_t = make_store(2, 8, 2, 700, 64, 32, seed=6)
    sigma = torch.rand(2, 32, generator=torch.Generator().manual_seed(6)) + 0.5
    seqlens = torch.tensor([700, 90])
    for r, k_top in ((1, 1), (8, 100), (32, 200)):
        args = (q, k_low_t, keys, v, r, k_top, sigma, None, group_select, seqlens)
        out = adaptive_decode(*args, backend="triton")
        torch.testing.assert_close(out, adaptive_decode_reference(*args), **OUT_TOL)


def test_pipelined_adaptive_step_and_a_store_read_in_place():
    # Batch 3 in two unequal halves (the two-stream path, run in turn off CUDA), and a store that
    # is a view of a preallocated buffer of capacity 500 > S: strides, not a copy.
    q, keys, v, _ = make_store(3, 8, 2, 300, 64, 32, seed=7)
    buffer = torch.zeros(3, 2, 32, 500)
    buffer[..., :300] = keys[..., :32].transpose(-1, -2)
    k_low_t = buffer[..., :300]
    halves = replace(DEFAULT_SETTINGS, pipeline="always", pipeline_min_sets=2, attention_splits=3)
    seqlens = torch.tensor([300, 37, 200])
    for group_select in (False, True):
        args = (q, k_low_t, keys, v, 12, 50, None, None, group_select, seqlens)
        out = adaptive_decode(*args, backend="triton", settings=halves)
        torch.testing.assert_close(out, adaptive_decode_reference(*args), **OUT_TOL)


# (batch, q_heads, kv_heads, seq, head_dim, d_max, r): MHA, GQA 4, a d_max that is no power of two.
FUSED_CASES = [(2, 4, 4, 300, 64, 16, 5), (1, 8, 2, 300, 128, 48, 16), (2, 6, 2, 70, 32, 32, 32)]


@pytest.mark.parametrize("case", FUSED_CASES, ids=["mha", "gqa4_dmax48", "r_is_dmax"])
@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("with_sigma", [False, True], ids=["no_sigma", "sigma"])
def test_the_kernel_chooses_the_coordinates_adaptive_coords_chooses(case, group_select, with_sigma):
    """The fused kernel ranks the coordinates itself; its scores equal the reference's from
    adaptive_coords' choice and the fp64 oracle's, with ragged lengths."""
    batch, hq, hkv, seq, dim, d_max, r = case
    q, keys, _, k_low_t = make_store(batch, hq, hkv, seq, dim, d_max, seed=11)
    gen = torch.Generator().manual_seed(12)
    sigma = torch.rand(hkv, d_max, generator=gen) + 0.2 if with_sigma else None
    seqlens = torch.tensor([seq, seq // 2][:batch])
    out = _adaptive_fused_triton(q, k_low_t, r, sigma, group_select, seqlens)
    coords = adaptive_coords(q, r, hkv, d_max, sigma)
    ref = adaptive_scores_reference(q, k_low_t, coords, group_select, seqlens)
    torch.testing.assert_close(out, ref, **SCORE_TOL)
    oracle = oracle_scores(q, keys, coords, group_select, seqlens)
    torch.testing.assert_close(out.double(), oracle, **ORACLE_TOL[torch.float32])


def test_the_kernel_breaks_ties_towards_the_lower_coordinate_as_adaptive_coords_does():
    # Only coordinates 3 and 9 carry weight, equal; zeros tie for the rest of r = 4.
    q = torch.zeros(1, 2, 16)
    q[0, :, 3] = 1.0
    q[0, :, 9] = -1.0
    keys = torch.randn(1, 1, 40, 16, generator=torch.Generator().manual_seed(13))
    k_low_t = keys.transpose(-1, -2).contiguous()
    assert adaptive_coords(q, 4, 1, 16).flatten().tolist() == [0, 1, 3, 9]
    q[0, :, 0] = 1e-3  # coordinates 0 and 1 now differ from the rest: still [0, 1, 3, 9]
    q[0, :, 1] = 1e-3
    out = _adaptive_fused_triton(q, k_low_t, 4, None, False, None)
    coords = torch.tensor([[[0, 1, 3, 9]]], dtype=torch.int32)
    torch.testing.assert_close(out, adaptive_scores_reference(q, k_low_t, coords), **SCORE_TOL)
    # r = 1: the exact tie between 3 and 9 goes to 3 in both (the scores tell which was read).
    assert adaptive_coords(q, 1, 1, 16).flatten().tolist() == [3]
    out = _adaptive_fused_triton(q, k_low_t, 1, None, False, None)
    three = torch.tensor([[[3]]], dtype=torch.int32)
    torch.testing.assert_close(out, adaptive_scores_reference(q, k_low_t, three), **SCORE_TOL)
    nine = adaptive_scores_reference(q, k_low_t, torch.tensor([[[9]]], dtype=torch.int32))
    assert not torch.allclose(out, nine)


@pytest.mark.parametrize("choice", ["kernel", "torch"])
def test_both_coordinate_choices_give_the_reference_step(choice):
    q, keys, v, k_low_t = make_store(2, 8, 2, 300, 64, 48, seed=14)
    sigma = torch.rand(2, 48, generator=torch.Generator().manual_seed(14)) + 0.5
    settings = replace(DEFAULT_SETTINGS, adaptive_choice=choice)
    for group_select in (False, True):
        args = (q, k_low_t, keys, v, 16, 40, sigma, None, group_select, torch.tensor([300, 77]))
        out = adaptive_decode(*args, backend="triton", settings=settings)
        torch.testing.assert_close(out, adaptive_decode_reference(*args), **OUT_TOL)
    with pytest.raises(ValueError, match="adaptive_choice"):
        replace(DEFAULT_SETTINGS, adaptive_choice="gpu")


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    seq=st.integers(1, 300),
    head_dim=st.sampled_from([16, 32]),
    data=st.data(),
)
def test_random_shapes_match_reference(batch, kv_heads, group, seq, head_dim, data):
    d_max = data.draw(st.integers(1, head_dim))
    r = data.draw(st.integers(1, d_max))
    group_select = data.draw(st.booleans())
    q, keys, _, k_low_t = make_store(batch, kv_heads * group, kv_heads, seq, head_dim, d_max)
    coords = adaptive_coords(q, r, kv_heads, d_max)
    out = adaptive_scores(q, k_low_t, coords, group_select, backend="triton")
    torch.testing.assert_close(out, adaptive_scores_reference(q, k_low_t, coords, group_select),
                               **SCORE_TOL)  # fmt: skip
    torch.testing.assert_close(out.double(), oracle_scores(q, keys, coords, group_select, None),
                               **ORACLE_TOL[torch.float32])  # fmt: skip


def test_bad_arguments_raise_value_error():
    q, keys, v, k_low_t = make_store(1, 4, 2, 40, 32, 16)
    coords = adaptive_coords(q, 4, 2, 16)
    with pytest.raises(ValueError, match="r must be"):
        adaptive_decode(q, k_low_t, keys, v, 17, 10)
    with pytest.raises(ValueError, match="r must be"):
        adaptive_decode(q, k_low_t, keys, v, 0, 10)
    with pytest.raises(ValueError, match="k_top"):
        adaptive_decode(q, k_low_t, keys, v, 4, 41)
    with pytest.raises(ValueError, match="k_low_t must be"):
        adaptive_decode(q, k_low_t[..., :39], keys, v, 4, 10)
    with pytest.raises(ValueError, match="coords must lie"):
        adaptive_scores(q, k_low_t, coords + 16, backend="triton")
    with pytest.raises(ValueError, match="coords must choose r"):
        adaptive_scores(q, k_low_t, torch.zeros(1, 2, 17, dtype=torch.int32))
    with pytest.raises(ValueError, match="sigma must be"):
        adaptive_coords(q, 4, 2, 16, torch.ones(2, 15))
    with pytest.raises(ValueError, match="not a multiple"):
        adaptive_coords(q, 4, 3, 16)
    with pytest.raises(ValueError, match="seqlens"):
        adaptive_scores(q, k_low_t, coords, seqlens=torch.tensor([41]))
