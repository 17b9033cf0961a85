"""Static caches: preallocated, written in place, and equal to the dynamic path through transformers."""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import HEAD_DIM, random_bases, random_tokens, tiny_llama
from transformers import DynamicCache

from keyspace.loki.cache import LokiCache
from keyspace.loki.decode import cache_kwargs, loki_decoding
from keyspace.loki.graphs import static_attention
from keyspace.loki.registry import use_attention
from keyspace.loki.static_cache import StaticKVCache, StaticLokiCache

BASIS = random_bases(2, 2, seed=5)
DIMS = [4, 7]


def generate(model, prompt, cache=None, new_tokens=8, handler=None):
    """Greedy generate(); with a cache, through `handler` (default: the static caches' attention)."""
    with torch.no_grad():
        if cache is None:
            return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        name = "cache" if "cache" in cache_kwargs(model, cache) else "past_key_values"
        context = (
            loki_decoding(model, cache)
            if handler == "dynamic"
            else use_attention(model, static_attention(cache))
        )
        with context:
            return model.generate(
                prompt, max_new_tokens=new_tokens, do_sample=False, **{name: cache}
            )


def forward(model, cache, tokens, handler):
    with torch.no_grad(), handler:
        return model(tokens, **cache_kwargs(model, cache)).logits[:, -1]


def test_update_writes_in_place_what_the_dynamic_loki_cache_holds():
    model, tokens = tiny_llama(), random_tokens(batch=2, length=14)
    dynamic, static = LokiCache(BASIS, DIMS, k=0.5), StaticLokiCache(BASIS, DIMS, 0.5, capacity=32)
    for chunk in (tokens[:, :10], tokens[:, 10:11], tokens[:, 11:12]):  # prefill, two steps
        expected = forward(model, dynamic, chunk, loki_decoding(model, dynamic))
        got = forward(model, static, chunk, use_attention(model, static_attention(static)))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if chunk.shape[1] == 10:
            addresses = [layer.k_low.data_ptr() for layer in static.layers]
    assert static.get_seq_length() == dynamic.get_seq_length() == 12
    for ours, theirs in zip(static.layers, dynamic.layers, strict=True):
        assert ours.k_low.shape == (2, 2, 32, ours.d)  # preallocated to capacity
        torch.testing.assert_close(ours.k_low[:, :, :12], theirs.k_low)
        torch.testing.assert_close(ours.k_rest[:, :, :12], theirs.k_rest)
        torch.testing.assert_close(ours.values[:, :, :12], theirs.values)
        assert ours.seqlens.tolist() == [12, 12]
    assert [layer.k_low.data_ptr() for layer in static.layers] == addresses  # no copy of the past


def test_generate_with_the_static_loki_cache_equals_the_dynamic_one():
    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    dynamic = generate(model, prompt, LokiCache(BASIS, DIMS, k=0.25), handler="dynamic")
    static = generate(model, prompt, StaticLokiCache(BASIS, DIMS, 0.25, capacity=24))
    assert torch.equal(static, dynamic)
    grouped = StaticLokiCache(BASIS, DIMS, 0.25, capacity=24, group_select=True)
    dynamic = LokiCache(BASIS, DIMS, k=0.25, group_select=True)
    assert torch.equal(
        generate(model, prompt, grouped), generate(model, prompt, dynamic, handler="dynamic")
    )
    assert model.config._attn_implementation == "sdpa"


def test_greedy_tokens_at_k_1_equal_dense():
    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    dense = generate(model, prompt)  # transformers' DynamicCache and SDPA
    assert torch.equal(
        generate(model, prompt, StaticLokiCache(BASIS, DIMS, 1.0, capacity=20)), dense
    )
    assert torch.equal(generate(model, prompt, StaticKVCache(2, capacity=20)), dense)


def test_crop_then_continue_equals_the_dynamic_path():
    model, tokens = tiny_llama(), random_tokens(batch=1, length=16)
    dynamic, static = LokiCache(BASIS, DIMS, k=0.5), StaticLokiCache(BASIS, DIMS, 0.5, capacity=20)
    forward(model, dynamic, tokens[:, :12], loki_decoding(model, dynamic))
    forward(model, static, tokens[:, :12], use_attention(model, static_attention(static)))
    dynamic.crop(9)
    static.crop(-3)  # a negative argument drops that many, like transformers' crop
    assert static.get_seq_length() == 9 and static.layers[1].seqlens.tolist() == [9]
    expected = forward(model, dynamic, tokens[:, 9:10], loki_decoding(model, dynamic))
    got = forward(model, static, tokens[:, 9:10], use_attention(model, static_attention(static)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    static.crop(0)
    assert static.get_seq_length() == 0


def test_reorder_keeps_the_buffers_and_matches_the_dynamic_path():
    model, tokens = tiny_llama(), random_tokens(batch=3, length=9)
    dynamic, static = LokiCache(BASIS, DIMS, k=0.5), StaticLokiCache(BASIS, DIMS, 0.5, capacity=12)
    forward(model, dynamic, tokens, loki_decoding(model, dynamic))
    forward(model, static, tokens, use_attention(model, static_attention(static)))
    addresses = [layer.values.data_ptr() for layer in static.layers]
    order = torch.tensor([2, 0, 1])
    dynamic.reorder_cache(order)
    static.reorder_cache(order)
    for ours, theirs in zip(static.layers, dynamic.layers, strict=True):
        torch.testing.assert_close(ours.k_low[:, :, :9], theirs.k_low)
        torch.testing.assert_close(ours.values[:, :, :9], theirs.values)
    assert [layer.values.data_ptr() for layer in static.layers] == addresses


def test_dense_static_cache_stores_keys_token_major_and_rewinds():
    model, tokens = tiny_llama(), random_tokens(batch=2, length=10)
    reference, static = DynamicCache(), StaticKVCache(2, capacity=16)
    with torch.no_grad():
        model(tokens, **cache_kwargs(model, reference))
    forward(model, static, tokens, use_attention(model, static_attention(static)))
    layer = static.layers[0]
    assert layer.key_store.shape == (2, 16, 2, HEAD_DIM)  # [B, capacity, Hkv, D]: flash's layout
    torch.testing.assert_close(layer.keys[:, :, :10], reference.layers[0].keys)
    torch.testing.assert_close(layer.values[:, :, :10], reference.layers[0].values)
    assert static.get_max_length() == 16 and static.get_seq_length() == 10
    static.set_length(4)
    assert layer.seqlens.tolist() == [4, 4] and static.get_seq_length() == 4


def test_capacity_and_settings_are_checked():
    model = tiny_llama()
    cache = StaticKVCache(2, capacity=6)
    with pytest.raises(ValueError, match="holds 6 tokens"):
        forward(
            model,
            cache,
            random_tokens(batch=1, length=8),
            use_attention(model, static_attention(cache)),
        )
    assert model.config._attn_implementation == "sdpa"  # restored after the error
    with pytest.raises(ValueError, match="length must be"):
        cache.set_length(7)
    with pytest.raises(ValueError, match="capacity"):
        StaticKVCache(2, capacity=0)
    with pytest.raises(ValueError, match="k must be"):
        StaticLokiCache(BASIS, DIMS, 0.0, capacity=8)
    with pytest.raises(ValueError, match="d must be"):
        StaticLokiCache(BASIS, [0, 4], 0.5, capacity=8)
