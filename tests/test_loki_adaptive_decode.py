"""Adaptive Loki in decode mode: `Loki(select="adaptive")`'s dynamic and static caches, checked
against dense decoding (r = d_max = D, k = 1), masked-mode loki-adaptive (the same kept set at a
step), each other (static = dynamic tokens), and the Triton path (the interpreter) against the
reference path."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from loki_fixtures import HEAD_DIM, random_bases, random_tokens, tiny_llama
from test_query_basis import invertible_pair
from tiny_models import tiny_model

import keyspace.kernels as kernels
from keyspace import Loki
from keyspace.loki.adaptive_cache import AdaptiveLokiCache, StaticAdaptiveLokiCache
from keyspace.loki.decode import cache_kwargs, last_logits, loki_decoding
from keyspace.loki.graphs import DecodeLoop, DecodeLoopSettings
from keyspace.loki.masked import SparseSettings, masked_attention
from keyspace.models.arch import head_geometry

EXACT = DecodeLoopSettings(bucket=1, prefill_chunk=8)  # one-token buckets: the exact budget


def sigma(layers: int, kv_heads: int, seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(layers, kv_heads, HEAD_DIM, generator=gen) * 3 + 0.1


def geometry(model) -> tuple[int, int]:
    _, kv_heads, head_dim = head_geometry(model.config)
    return kv_heads, head_dim


def stepwise_logits(model, cache, ids: torch.Tensor, steps: int, handler_of=None):
    """Prefill ids (B, P), then `steps` greedy steps; every step's logits (steps + 1, B, vocab)."""
    context = handler_of(model, cache) if handler_of else contextlib.nullcontext()
    out = []
    with torch.no_grad(), context:
        logits = last_logits(model, cache, ids)
        for _ in range(steps):
            out.append(logits)
            logits = last_logits(model, cache, logits.argmax(-1)[:, None])
    return torch.stack(out + [logits])


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])  # GQA; MHA with partial rotary
def test_full_rank_full_budget_gives_the_dense_tokens_and_logits(arch):
    from transformers import DynamicCache

    model = tiny_model(arch)
    kv_heads, head_dim = geometry(model)
    layers = model.config.num_hidden_layers
    loki = Loki.from_tensors(
        random_bases(layers, kv_heads, head_dim, seed=3), d=head_dim, k=1.0, select="adaptive",
        key_scale=sigma(layers, kv_heads),
    )  # fmt: skip
    ids = random_tokens(batch=2, length=12, vocab=100)
    dense = stepwise_logits(model, DynamicCache(), ids, 6)
    cache = loki.cache(model)
    assert isinstance(cache, AdaptiveLokiCache)
    sparse = stepwise_logits(model, cache, ids, 6, loki_decoding)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(sparse.argmax(-1), dense.argmax(-1))
    assert cache.layers[0].k_low_t.shape == (2, kv_heads, head_dim, 12 + 6)


def masked_step(model, tokens, settings) -> torch.Tensor:
    with torch.no_grad(), masked_attention(model, settings):
        return model(tokens, use_cache=False).logits[0, -1]


def decode_step(model, cache, tokens) -> torch.Tensor:
    with torch.no_grad(), loki_decoding(model, cache):
        model(tokens[:, :-1], **cache_kwargs(model, cache))
        return model(tokens[:, -1:], **cache_kwargs(model, cache)).logits[0, -1]


@pytest.mark.parametrize("group_select", [False, True])
@pytest.mark.parametrize("basis_kind", ["key", "query-aware"])
def test_a_sparse_step_equals_masked_mode_loki_adaptive_in_row_mode(group_select, basis_kind):
    """One layer, GQA: the last token's logits depend only on layer-0 keys, so the decode step and
    masked mode's last row keep the same set, and give the same logits."""
    model, tokens = tiny_llama(layers=1), random_tokens(batch=1, length=25)
    if basis_kind == "key":
        basis, query_basis = random_bases(1, 2, seed=2), None
    else:
        basis, query_basis = invertible_pair(1, 2, seed=2)
    r, k, scale = 3, 0.25, sigma(1, 2)
    masked = masked_step(
        model, tokens,
        SparseSettings("loki-adaptive", k=k, k_mode="row", dims=torch.full((1, 2), r),
                       basis=basis, group_select=group_select, query_basis=query_basis,
                       key_scale=scale),
    )  # fmt: skip
    loki = Loki.from_tensors(
        basis, r, k, query_basis, group_select, select="adaptive", key_scale=scale
    )
    step = decode_step(model, loki.cache(model), tokens)
    torch.testing.assert_close(step, masked, atol=1e-5, rtol=1e-5)
    # not vacuous: the budget bit, and the per-step choice is not fixed-d Loki's first r
    assert (step - model(tokens).logits[0, -1]).abs().max() > 1e-4
    fixed = Loki.from_tensors(basis, r, k, query_basis, group_select)
    assert (step - decode_step(model, fixed.cache(model), tokens)).abs().max() > 1e-4


def test_sigma_and_d_max_reach_the_step():
    """The same step with σ or d_max changed keeps other tokens: both are used, not just stored."""
    model, tokens = tiny_llama(layers=1), random_tokens(batch=1, length=25)
    basis = random_bases(1, 2, seed=2)

    def step(**extra):
        loki = Loki.from_tensors(basis, 2, 0.2, select="adaptive", **extra)
        return decode_step(model, loki.cache(model), tokens)

    plain, scaled = step(), step(key_scale=sigma(1, 2, seed=9) ** 4)
    assert (plain - scaled).abs().max() > 1e-4
    narrow = step(d_max=2)  # r = d_max: the first two coordinates, fixed-d Loki at d=2
    fixed = decode_step(model, Loki.from_tensors(basis, 2, 0.2).cache(model), tokens)
    torch.testing.assert_close(narrow, fixed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("group_select", [False, True])
def test_the_static_cache_gives_the_dynamic_caches_tokens(arch, group_select):
    model = tiny_model(arch)
    kv_heads, head_dim = geometry(model)
    layers = model.config.num_hidden_layers
    loki = Loki.from_tensors(
        random_bases(layers, kv_heads, head_dim, seed=3), d=3, k=0.3, group_select=group_select,
        select="adaptive", d_max=8, key_scale=sigma(layers, kv_heads),
    )  # fmt: skip
    ids = random_tokens(batch=2, length=20, vocab=100)
    static = loki.static_cache(model, 32)
    assert isinstance(static, StaticAdaptiveLokiCache)
    with DecodeLoop(model, static, EXACT, graphs=False) as loop:
        tokens = loop.generate(ids, 8)
    assert torch.equal(tokens, loki.generate(model, ids, max_new_tokens=8)[:, 20:])
    layer = static.layers[0]
    assert layer.k_low_t.shape == (2, kv_heads, 8, 32) and layer.keys.shape[2] == 32
    # the coordinate-major store holds the first d_max rotated coordinates of every token
    torch.testing.assert_close(
        layer.k_low_t[..., : layer.length], layer.keys[:, :, : layer.length, :8].transpose(-1, -2)
    )


def test_static_writes_are_in_place():
    model = tiny_llama()
    loki = Loki.from_tensors(random_bases(2, 2), d=4, budget=5, select="adaptive")
    static = loki.static_cache(model, 40)
    with DecodeLoop(model, static, EXACT, graphs=False) as loop:
        loop.prefill(random_tokens(batch=2, length=10))
        addresses = [(x.keys.data_ptr(), x.k_low_t.data_ptr()) for x in static.layers]
        for _ in range(4):
            loop.step()
    assert [(x.keys.data_ptr(), x.k_low_t.data_ptr()) for x in static.layers] == addresses
    assert static.get_seq_length() == 14


def test_one_step_through_triton_equals_the_reference(monkeypatch):
    """The whole model step with the Triton kernels (interpreter) reading the static store in place
    (strided views, seqlens) against the reference path on the same cache."""
    model, ids = tiny_llama(layers=1), random_tokens(batch=2, length=21)
    loki = Loki.from_tensors(
        random_bases(1, 2, seed=1), d=3, k=0.3, group_select=False, select="adaptive",
        d_max=12, key_scale=sigma(1, 2),
    )  # fmt: skip
    static = loki.static_cache(model, 24)
    with DecodeLoop(model, static, EXACT, graphs=False) as loop:
        loop.prefill(ids)
        reference = loop._forward(loop._token, loop._position)  # [B, vocab]
        static.set_length(21)  # rewind the step's write
        calls = []
        triton = functools.partial(kernels.adaptive_decode, backend="triton")

        def forced(*args, **kwargs):
            calls.append(1)
            return triton(*args, **kwargs)

        monkeypatch.setattr(kernels, "adaptive_decode", forced)
        through_triton = loop._forward(loop._token, loop._position)
    assert calls == [1]
    torch.testing.assert_close(through_triton, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"select": "magic"}, "select must be one of"),
        ({"select": "adaptive", "d_max": 3}, "d_max must be an int in"),
        ({"select": "adaptive", "d_max": 17}, "d_max must be an int in"),
        ({"select": "adaptive", "key_scale": torch.ones(2, 2, 15)}, "key_scale must be"),
        ({"select": "adaptive", "key_scale": -torch.ones(2, 2, 16)}, "key_scale must be"),
    ],
)
def test_bad_adaptive_arguments_are_keyspace_errors(kwargs, message):
    from keyspace.errors import KeyspaceError

    with pytest.raises(KeyspaceError, match=message) as err:
        Loki.from_tensors(random_bases(2, 2), 4, **kwargs)
    assert err.value.hint
    assert "select=adaptive, d_max=16" in repr(
        Loki.from_tensors(random_bases(2, 2), 4, select="adaptive")
    )
