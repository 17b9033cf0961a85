"""loki-adaptive: each query row scores on its own r basis coordinates, the r largest |q~_j|·sigma_j.

Checked against exact top-k (r = D), SparQ (identity basis, sigma = 1), and a row-by-row loop.
"""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import HEAD_DIM, random_bases
from runfolder_fixtures import moments_of
from test_query_basis import invertible_pair

from keyspace.loki import SparseSettings, get_method
from keyspace.loki.masked import layer_inputs
from keyspace.loki.methods.adaptive import chosen_coordinates
from keyspace.loki.methods.common import group_sum, keep_top

LAYERS, Q_HEADS, T = 1, 4, 20
ADAPTIVE = get_method("loki-adaptive").select


def bases(kind: str, kv_heads: int):
    if kind == "key":
        return random_bases(LAYERS, kv_heads, seed=2), None
    return invertible_pair(LAYERS, kv_heads, seed=2)


def sigma(kv_heads: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(LAYERS, kv_heads, HEAD_DIM, generator=gen) * 3 + 0.1


def qk(kv_heads: int, seed: int = 0, q_len: int = T):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, Q_HEADS, q_len, HEAD_DIM, generator=gen)
    return query, torch.randn(1, kv_heads, T, HEAD_DIM, generator=gen)


def inputs(kv_heads=2, basis="key", r=HEAD_DIM, seed=0, q_len=T, **extra):
    key_t, query_t = bases(basis, kv_heads)
    extra.setdefault("k", 0.25)
    extra.setdefault("key_scale", sigma(kv_heads))
    settings = SparseSettings(
        "loki-adaptive",
        dims=torch.full((LAYERS, kv_heads), r),
        basis=key_t,
        query_basis=query_t,
        **extra,
    )
    query, key = qk(kv_heads, seed, q_len)
    return layer_inputs(settings, 0, query, key, HEAD_DIM**-0.5)


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


@pytest.mark.parametrize("basis", ["key", "query-aware"])
@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA, GQA
@pytest.mark.parametrize("k_mode", ["window", "row"])
@pytest.mark.parametrize("group_select", [False, True])
def test_at_r_equal_d_it_is_exact_top_k(basis, kv_heads, k_mode, group_select):
    inp = inputs(kv_heads, basis, k_mode=k_mode, group_select=group_select)
    exact = inp.exact_scores.double()
    if group_select:
        exact = group_sum(exact, inp.group_size)
    assert torch.equal(kept(ADAPTIVE(inp)), keep_top(exact, inp.budget, inp.causal))
    # below full rank the selection differs, so the check is not vacuous
    low = inputs(kv_heads, basis, r=2, k_mode=k_mode, group_select=group_select)
    assert not torch.equal(kept(ADAPTIVE(low)), kept(ADAPTIVE(inp)))


@pytest.mark.parametrize("key_scale", [None, "ones"])
def test_in_the_identity_basis_with_unit_scales_it_is_sparq(key_scale):
    eye = torch.eye(HEAD_DIM).expand(LAYERS, 4, HEAD_DIM, HEAD_DIM).contiguous()
    dims = torch.tensor([[3, 5, 1, 7]])
    scale = torch.ones(LAYERS, 4, HEAD_DIM) if key_scale else None
    query, key = qk(4)
    adaptive = SparseSettings("loki-adaptive", k=0.25, dims=dims, basis=eye, key_scale=scale)
    sparq = SparseSettings("sparq", k=0.25, dims=dims)
    got = ADAPTIVE(layer_inputs(adaptive, 0, query, key, 0.25))
    expected = get_method("sparq").select(layer_inputs(sparq, 0, query, key, 0.25))
    assert torch.equal(kept(got), kept(expected))


@pytest.mark.parametrize("basis", ["key", "query-aware"])
@pytest.mark.parametrize("group_select", [False, True])
def test_one_row_by_hand(basis, group_select):
    """Row by row in float64: weights, the r best coordinates, their partial scores, the top k."""
    r = 3
    inp = inputs(2, basis, r=r, k=0.3, k_mode="row", group_select=group_select)
    key_t, query_t = bases(basis, 2)
    query_t = key_t if query_t is None else query_t
    scale = sigma(2).double()
    query, key = qk(2)
    got = kept(ADAPTIVE(inp))
    for head in range(Q_HEADS):
        kv = head // 2
        group = [2 * kv, 2 * kv + 1]  # the group always shares its coordinates
        heads = group if group_select else [head]
        for row in (0, 7, T - 1):
            weight = sum(
                (query_t[0, kv].double() @ query[0, h, row].double()).abs() * scale[0, kv]
                for h in group
            )
            coords = weight.argsort(descending=True)[:r]
            keys_t = key[0, kv, : row + 1].double() @ key_t[0, kv].double().T  # [row+1, D]
            scores = sum(
                keys_t[:, coords] @ (query_t[0, kv].double() @ query[0, h, row].double())[coords]
                for h in heads
            )
            budget = int(inp.budget[row])
            expected = set(scores.topk(budget).indices.tolist())
            assert set(got[0, head, row].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("group_select", [False, True])
def test_the_group_shares_one_coordinate_set(group_select):
    """Each KV head's query heads score on the same r coordinates (r·S bytes per KV head, as the
    decode kernel reads), with or without group select (which shares the token set too)."""
    inp = inputs(2, "query-aware", r=4, group_select=group_select)
    shared = chosen_coordinates(inp)  # [B, Hq, T, D]
    assert torch.equal(shared[:, 0], shared[:, 1]) and torch.equal(shared[:, 2], shared[:, 3])
    assert (shared.sum(-1) == 4).all() and not torch.equal(shared[:, 0], shared[:, 2])
    mha = chosen_coordinates(inputs(4, "query-aware", r=4, group_select=group_select))
    assert not torch.equal(mha[:, 0], mha[:, 1])  # one head per KV head: each picks its own


def test_sigma_steers_the_choice():
    """A large key spread makes a small query coordinate the one that moves the scores."""
    scale = torch.ones(LAYERS, 4, HEAD_DIM)
    plain = chosen_coordinates(inputs(4, r=1, key_scale=scale))
    index = plain[0, 0, 5].argmax()
    scale[0, 0] = 1.0
    scale[0, 0, (index + 1) % HEAD_DIM] = 1e6
    steered = chosen_coordinates(inputs(4, r=1, key_scale=scale))
    assert steered[0, 0, 5].argmax() == (index + 1) % HEAD_DIM


def test_coordinates_beyond_d_max_are_never_chosen():
    picked = chosen_coordinates(inputs(2, r=3, d_max=5))
    assert picked[..., 5:].sum() == 0 and (picked.sum(-1) == 3).all()
    with pytest.raises(ValueError, match="d_max"):
        inputs(2, r=6, d_max=5)
    direct = inputs(2, r=3, d_max=5)
    direct.d_max = 2  # LayerInputs built by hand: the method checks too
    with pytest.raises(ValueError, match="exceeds d_max"):
        ADAPTIVE(direct)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"key_scale": torch.ones(LAYERS, 2, HEAD_DIM - 1)}, "key_scale"),
        ({"dims": None}, "needs dims"),
        ({"basis": None}, "needs a basis"),
    ],
)
def test_settings_check_what_adaptive_needs(extra, message):
    fields = dict(k=0.25, dims=torch.full((LAYERS, 2), 4), basis=random_bases(LAYERS, 2))
    with pytest.raises(ValueError, match=message):
        SparseSettings("loki-adaptive", **(fields | extra))


def test_validate_key_scales_are_the_spread_of_each_basis_coordinate():
    """sigma_j from the calibration = the std of coordinate j of the transformed keys, in both
    bases: the key covariance's eigenvalues, and the score eigenvalues for k~ = A k."""
    from keyspace.analyze.spectra import pca_from_moments, score_spectrum
    from keyspace.runfolder.calibration import Calibration
    from keyspace.validate.inputs import key_scales

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(HEAD_DIM, HEAD_DIM, generator=gen, dtype=torch.float64)
    keys = torch.randn(1, 4000, 1, HEAD_DIM, generator=gen, dtype=torch.float64) @ mix + 2.0
    queries = torch.randn(1, 4000, 1, HEAD_DIM, generator=gen, dtype=torch.float64) @ mix.T
    pca, spectrum = (
        pca_from_moments(moments_of(keys)),
        score_spectrum(moments_of(keys), moments_of(queries)),
    )
    calibration = Calibration(
        mean={"post": pca.mean.float()},
        components={"post": pca.components.float()},
        eigenvalues={"post": pca.eigenvalues.float()},
        score_key_transform={"post": spectrum.key_transform.float()},
        score_query_transform={"post": spectrum.query_transform.float()},
        score_eigenvalues={"post": spectrum.eigenvalues.float()},
    )
    scales = key_scales(calibration, "post", ("key", "query-aware"))
    for basis, transform in (("key", pca.components), ("query-aware", spectrum.key_transform)):
        spread = (keys[0, :, 0] @ transform[0, 0].T).std(dim=0)  # [D]
        torch.testing.assert_close(scales[basis][0, 0].double(), spread, rtol=1e-4, atol=1e-6)
    assert set(key_scales(calibration, "post", ("key",))) == {"key"}
