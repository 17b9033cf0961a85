"""Masked-mode Loki through AttentionInterface works beyond Llama: Qwen3 (k_norm), Mistral, GPT-NeoX
(partial rotary), on the shared tiny configs (tests/tiny_models.py)."""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import logits_of, random_bases, random_tokens
from tiny_models import tiny_model

from keyspace.loki import SparseSettings


@pytest.mark.parametrize("name", ["qwen3", "mistral", "gpt_neox"])
def test_full_and_full_rank_loki_match_the_model(name):
    model, tokens = tiny_model(name), random_tokens()
    kv_heads = (
        getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    )
    dense = logits_of(model, tokens)
    torch.testing.assert_close(
        logits_of(model, tokens, SparseSettings("full")), dense, atol=1e-5, rtol=1e-5
    )
    dims = torch.full((2, kv_heads), 16)
    exact = SparseSettings("loki", k=1.0, dims=dims, basis=random_bases(2, kv_heads))
    assert ((logits_of(model, tokens, exact) - dense).abs().max() / dense.abs().max()) < 1e-4
    sparse = SparseSettings(
        "loki", k=0.25, dims=torch.full((2, kv_heads), 2), basis=random_bases(2, kv_heads)
    )
    assert (logits_of(model, tokens, sparse) - dense).abs().max() > 1e-4
