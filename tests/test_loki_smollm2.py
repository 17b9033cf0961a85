"""Loki inside the real SmolLM2-135M (GGUF from PyPI, cached after the first load)."""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import logits_of, random_bases

from keyspace.loki import LokiCache, SparseSettings, loki_decoding
from keyspace.loki.decode import cache_kwargs


@pytest.fixture(scope="module")
def smollm2():
    from keyspace.collect.corpora import load_token_windows
    from keyspace.models.loading import load_model

    loaded = load_model("smollm2-135m")
    tokens = load_token_windows("pydoc", loaded.tokenizer, 128, 128)
    return loaded.model, tokens


@pytest.mark.slow
def test_masked_modes_on_smollm2(smollm2):
    model, tokens = smollm2
    layers, kv_heads, head_dim = 30, 3, 64
    basis = random_bases(layers, kv_heads, head_dim)
    dense = logits_of(model, tokens)
    ours = logits_of(model, tokens, SparseSettings("full"))
    assert ((ours - dense).abs().max() / dense.abs().max()) < 1e-4
    exact = SparseSettings(
        "loki", k=1.0, dims=torch.full((layers, kv_heads), head_dim), basis=basis
    )
    assert ((logits_of(model, tokens, exact) - dense).abs().max() / dense.abs().max()) < 1e-4
    sparse = SparseSettings("loki", k=0.125, dims=torch.full((layers, kv_heads), 32), basis=basis)
    assert (logits_of(model, tokens, sparse) - dense).abs().max() > 1e-2


@pytest.mark.slow
def test_loki_cache_generate_on_smollm2_is_exact_at_full_rank(smollm2):
    model, tokens = smollm2
    prompt = tokens[:, :64]
    with torch.no_grad():
        dense = model.generate(prompt, max_new_tokens=6, do_sample=False)
        cache = LokiCache(random_bases(30, 3, 64), [64] * 30, k=1.0)
        name = next(iter(cache_kwargs(model, cache)))
        with loki_decoding(model, cache):
            sparse = model.generate(prompt, max_new_tokens=6, do_sample=False, **{name: cache})
    assert torch.equal(sparse, dense)
