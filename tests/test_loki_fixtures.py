"""Shared helpers for the Loki and validate tests: tiny random-init models and random bases."""

from __future__ import annotations

import torch

HEAD_DIM = 16


def tiny_llama(seed: int = 0, layers: int = 2, attn: str = "sdpa"):
    """A random-init Llama: hidden 64, 4 query heads, 2 KV heads, head_dim 16, float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_bases(
    layers: int, kv_heads: int, head_dim: int = HEAD_DIM, seed: int = 0
) -> torch.Tensor:
    """(layers, kv_heads, D, D) random orthonormal matrices, rows as directions."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(layers, kv_heads, head_dim, head_dim, generator=gen)
    q, _ = torch.linalg.qr(raw)
    return q.transpose(-1, -2).contiguous()


def random_tokens(
    batch: int = 2, length: int = 24, vocab: int = 128, seed: int = 0
) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_random_bases_are_orthonormal():
    basis = random_bases(2, 2)
    eye = torch.eye(HEAD_DIM).expand_as(basis)
    torch.testing.assert_close(basis @ basis.transpose(-1, -2), eye, atol=1e-5, rtol=0)
