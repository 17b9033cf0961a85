"""Masked-mode Loki and its baselines on tiny random-init Llama models."""

from __future__ import annotations

import math

import pytest
import torch
from loki_fixtures import HEAD_DIM, logits_of, random_bases, random_tokens, tiny_llama

from keyspace.errors import KeyspaceError
from keyspace.loki.masked import SparseSettings, causal_mask, masked_attention, row_budgets
from keyspace.loki.methods import METHODS, LayerInputs
from keyspace.loki.registry import use_attention

LAYERS, KV_HEADS = 2, 2


def full_dims(d: int = HEAD_DIM) -> torch.Tensor:
    return torch.full((LAYERS, KV_HEADS), d, dtype=torch.long)


def assert_rel_close(actual, expected, rel=1e-4):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err < rel, f"relative error {err:.2e}"


def test_full_matches_transformers_eager_and_sdpa():
    tokens = random_tokens()
    ours = logits_of(tiny_llama(), tokens, SparseSettings("full"))
    torch.testing.assert_close(
        ours, logits_of(tiny_llama(attn="eager"), tokens), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        ours, logits_of(tiny_llama(attn="sdpa"), tokens), atol=1e-5, rtol=1e-5
    )


def test_loki_at_full_rank_and_k1_reproduces_full():
    model, tokens = tiny_llama(), random_tokens()
    reference = logits_of(model, tokens)
    settings = SparseSettings("loki", k=1.0, dims=full_dims(), basis=random_bases(LAYERS, KV_HEADS))
    assert_rel_close(logits_of(model, tokens, settings), reference)


@pytest.mark.parametrize("k_mode", ["window", "row"])
def test_exact_topk_at_k1_equals_full(k_mode):
    model, tokens = tiny_llama(), random_tokens()
    assert_rel_close(
        logits_of(model, tokens, SparseSettings("exact-topk", k=1.0, k_mode=k_mode)),
        logits_of(model, tokens),
    )


def test_pcaattn_at_full_rank_and_sparq_at_full_rank():
    model, tokens = tiny_llama(), random_tokens()
    basis = random_bases(LAYERS, KV_HEADS)
    assert_rel_close(
        logits_of(model, tokens, SparseSettings("pcaattn", dims=full_dims(), basis=basis)),
        logits_of(model, tokens),
    )
    exact = logits_of(model, tokens, SparseSettings("exact-topk", k=0.25))
    assert_rel_close(
        logits_of(model, tokens, SparseSettings("sparq", k=0.25, dims=full_dims())), exact
    )


def test_loki_at_low_rank_differs_from_full():
    model, tokens = tiny_llama(), random_tokens()
    settings = SparseSettings(
        "loki", k=0.125, dims=full_dims(2), basis=random_bases(LAYERS, KV_HEADS)
    )
    assert (logits_of(model, tokens, settings) - logits_of(model, tokens)).abs().max() > 1e-3


def test_budgets_window_and_row_modes():
    assert row_budgets(0.25, "window", 8, 8).tolist() == [1, 2, 2, 2, 2, 2, 2, 2]
    assert row_budgets(0.25, "row", 8, 8).tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert row_budgets(0.1, "window", 30, 30).max() == 3  # 0.1·30 is 3, not 4
    assert row_budgets(1.0, "row", 4, 4).tolist() == [1, 2, 3, 4]
    assert row_budgets(0.5, "row", 1, 6).tolist() == [3]  # a decode step: one query, six keys


def random_inputs(method: str, q_len=12, seed=0, k=0.25, k_mode="window"):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 4, q_len, HEAD_DIM, generator=gen)
    key = torch.randn(1, 4, q_len, HEAD_DIM, generator=gen)
    basis = random_bases(1, 4, seed=seed)[0]
    return LayerInputs(
        query=query,
        key=key,
        scale=HEAD_DIM**-0.5,
        causal=causal_mask(q_len, q_len, query.device),
        budget=row_budgets(k, k_mode, q_len, q_len),
        basis=basis,
        dims=torch.full((4,), 4),
    )


def test_streaming_keeps_sinks_and_recent_tokens():
    inputs = random_inputs("streaming", q_len=20, k=0.3)  # budget 6: 4 sinks + 2 recent
    kept = torch.isfinite(METHODS["streaming"].select(inputs))[0, 0, 19]
    assert kept.nonzero().flatten().tolist() == [0, 1, 2, 3, 18, 19]


def test_h2o_keeps_the_recent_half_and_heavy_hitters():
    inputs = random_inputs("h2o", q_len=20, k=0.4)  # budget 8: 4 recent + 4 heavy
    kept = torch.isfinite(METHODS["h2o"].select(inputs))[0, :, 19]
    assert kept[:, 16:].all()
    assert (kept[:, :16].sum(-1) == 4).all()


def capture_layer0(model, tokens):
    """Layer 0's attention inputs (query, key, value, scale) from a dense forward."""
    seen = {}

    def record(module, query, key, value, scale):
        if module.layer_idx == 0:
            seen.update(query=query, key=key, value=value, scale=scale)
        return dense_output(query, key, value, scale)

    with torch.no_grad(), use_attention(model, record):
        model(tokens, use_cache=False)
    return seen


def dense_output(query, key, value, scale):
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key.repeat_interleave(groups, 1),
        value.repeat_interleave(groups, 1),
        is_causal=True,
        scale=scale,
    )
    return out.transpose(1, 2)


def test_one_row_equals_a_hand_computation():
    """Loki on head 3 (KV head 1), row 17 of layer 0, recomputed by hand from the captured q, k, v."""
    model, tokens = tiny_llama(), random_tokens(batch=1, length=24)
    seen = capture_layer0(model, tokens)
    basis = random_bases(LAYERS, KV_HEADS, seed=3)
    dims = torch.tensor([[3, 5], [2, 2]])
    settings = SparseSettings("loki", k=0.25, k_mode="row", dims=dims, basis=basis)
    from keyspace.loki.masked import masked_handler

    module = model.model.layers[0].self_attn
    out = masked_handler(settings)(module, seen["query"], seen["key"], seen["value"], seen["scale"])

    head, row, kv_head, d = 3, 17, 1, 5
    q = seen["query"][0, head, row]
    keys, values = seen["key"][0, kv_head, : row + 1], seen["value"][0, kv_head, : row + 1]
    rotation = basis[0, kv_head]
    approx = (rotation[:d] @ q) @ (keys @ rotation[:d].T).T
    budget = math.ceil(0.25 * (row + 1))
    chosen = approx.topk(budget).indices
    weights = torch.softmax((keys[chosen] @ q) * seen["scale"], dim=0)
    torch.testing.assert_close(out[0, row, head], weights @ values[chosen], atol=1e-6, rtol=1e-5)


def test_model_is_restored_after_the_block_also_on_error():
    model = tiny_llama()
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with masked_attention(model, SparseSettings("full")):
            assert model.config._attn_implementation == "keyspace"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert all(
        layer.self_attn.config._attn_implementation == before for layer in model.model.layers
    )
    tokens = random_tokens()
    torch.testing.assert_close(logits_of(model, tokens), logits_of(tiny_llama(), tokens))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "full", "k": 0.0}, "k must be"),
        ({"method": "full", "k": 1.5}, "k must be"),
        ({"method": "full", "k_mode": "col"}, "k_mode"),
        ({"method": "loki", "k": 0.5}, "needs dims"),
    ],
)
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseSettings(**kwargs)


def test_an_unknown_method_is_one_error_listing_the_registry():
    with pytest.raises(KeyspaceError, match="unknown method 'nope'") as err:
        SparseSettings("nope")
    assert "loki-adaptive" in err.value.hint


def test_token_budgets_are_the_same_in_both_modes_and_capped_by_the_context():
    for mode in ("window", "row"):
        assert row_budgets(None, mode, 8, 8, budget=3).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
        assert row_budgets(None, mode, 1, 4096, budget=2048).tolist() == [2048]  # a decode step
        assert row_budgets(None, mode, 3, 8, budget=100).tolist() == [6, 7, 8]  # whole context
    assert row_budgets(None, "row", 8, 8, dense_rows=5, budget=2).tolist() == [
        1, 2, 3, 4, 5, 2, 2, 2,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "k, budget, message",
    [(0.5, 4, "not both"), (None, 0, "positive"), (None, -3, "positive"), (None, True, "positive"),
     (None, 2.5, "positive")],
)  # fmt: skip
def test_settings_take_a_fraction_or_a_token_budget(k, budget, message):
    with pytest.raises(ValueError, match=message):
        SparseSettings("exact-topk", k=k, budget=budget)
    if budget is not None and not isinstance(budget, float | bool):
        with pytest.raises(ValueError, match=message):
            row_budgets(k, "window", 4, 4, budget=budget)


@pytest.mark.parametrize("method", ["exact-topk", "loki"])
def test_a_token_budget_in_a_model(method):
    """In window mode a fraction k of T tokens is the token budget ceil(k·T); a budget above every
    context is dense attention; between, each row keeps min(budget, context) keys."""
    model, tokens = tiny_llama(), random_tokens()  # T = 24
    extra = (
        {"dims": full_dims(3), "basis": random_bases(LAYERS, KV_HEADS)} if method == "loki" else {}
    )
    as_budget = logits_of(model, tokens, SparseSettings(method, budget=6, k_mode="row", **extra))
    as_fraction = logits_of(model, tokens, SparseSettings(method, k=0.25, **extra))
    torch.testing.assert_close(as_budget, as_fraction)
    assert (as_budget - logits_of(model, tokens)).abs().max() > 1e-3
    everything = SparseSettings(method, budget=10_000, **extra)
    assert_rel_close(logits_of(model, tokens, everything), logits_of(model, tokens))
    inputs = random_inputs(method, q_len=12)
    inputs.budget = row_budgets(None, "row", 12, 12, budget=5)
    kept = torch.isfinite(METHODS[method].select(inputs))
    assert (kept.sum(-1) == inputs.causal.sum(-1).clamp(max=5)).all()


def test_group_select_keeps_one_set_per_kv_head_and_is_exact_at_k1():
    inputs = random_inputs("loki", k=0.25)
    inputs.group_size, inputs.group_select = 2, True
    kept = torch.isfinite(METHODS["loki"].select(inputs))
    assert torch.equal(kept[:, 0], kept[:, 1]) and torch.equal(kept[:, 2], kept[:, 3])
    assert (kept.sum(-1) == inputs.budget).all()
    model, tokens = tiny_llama(), random_tokens()
    settings = SparseSettings(
        "loki", k=1.0, dims=full_dims(4), basis=random_bases(LAYERS, KV_HEADS), group_select=True
    )
    assert_rel_close(logits_of(model, tokens, settings), logits_of(model, tokens))


def test_dispatch_outside_a_block_and_padded_masks_are_refused():
    from keyspace.loki.registry import _dispatch

    model = tiny_llama()
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, HEAD_DIM)
    kv = torch.randn(1, 2, 3, HEAD_DIM)
    with pytest.raises(RuntimeError, match="outside a `use_attention` block"):
        _dispatch(module, q, kv, kv, None)
    padded = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    padded[..., 0] = False
    with use_attention(model, lambda *args: None), pytest.raises(ValueError, match="unpadded"):
        _dispatch(module, q, kv, kv, padded)


def test_random_bases_are_orthonormal():
    basis = random_bases(2, 2)
    eye = torch.eye(HEAD_DIM).expand_as(basis)
    torch.testing.assert_close(basis @ basis.transpose(-1, -2), eye, atol=1e-5, rtol=0)
