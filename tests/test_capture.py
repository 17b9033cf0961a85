"""Capture records pre/post-RoPE keys per KV head and queries per query head, leaves logits alone,
and restores the model."""

import sys

import pytest
import torch
from tiny_models import tiny_model

from keyspace.collect.capture import capture_keys, pool_groups
from keyspace.errors import KeyspaceError
from keyspace.models.arch import ARCHITECTURES, arch_spec, attention_modules, head_geometry

ARCHS = sorted(ARCHITECTURES)


def _rotary_module(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


def _apply_hf_rope(model, pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """HF's own RoPE (the model file's apply_rotary_pos_emb) on keys (B, T, Hkv, D)."""
    apply = sys.modules[type(model).__module__].apply_rotary_pos_emb
    cos, sin = _rotary_module(model)(pre, positions)
    k = pre.transpose(1, 2)
    _, rotated = apply(k, k, cos, sin)
    return rotated.transpose(1, 2)


def _record(model, ids):
    got = {}
    with capture_keys(
        model, lambda kind, layer, keys: got.__setitem__((kind, layer), keys.clone())
    ):
        logits = model(ids).logits
    return got, logits


@pytest.mark.parametrize("arch", ARCHS)
def test_post_rope_equals_hf_rope_of_pre(arch):
    model = tiny_model(arch)
    heads, kv_heads, head_dim = head_geometry(model.config)
    ids = torch.randint(0, 300, (2, 13))
    with torch.no_grad():
        reference = model(ids).logits
        got, logits = _record(model, ids)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    positions = torch.arange(13).expand(2, 13)
    for layer in range(model.config.num_hidden_layers):
        pre, post = got[("pre", layer)], got[("post", layer)]
        assert pre.shape == post.shape == (2, 13, kv_heads, head_dim)
        torch.testing.assert_close(post, _apply_hf_rope(model, pre, positions), rtol=0, atol=1e-5)
        # RoPE must actually have changed something, else the check above is vacuous.
        assert (post - pre).abs().max() > 1e-3


def test_pre_keys_match_projection_by_hand_for_llama():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (1, 7))
    captured_input = {}
    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda m, i, o: captured_input.__setitem__("x", i[0])
    )
    with torch.no_grad():
        got, _ = _record(model, ids)
    hook.remove()
    attn = model.model.layers[1].self_attn
    by_hand = (captured_input["x"] @ attn.k_proj.weight.T).view(1, 7, 2, 16)
    torch.testing.assert_close(got[("pre", 1)], by_hand)


def _model_state(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    impls = {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    return hooks, impls, model.config._attn_implementation


def _record_queries(model, ids):
    keys, queries = {}, {}
    with capture_keys(
        model,
        lambda kind, layer, k: keys.__setitem__((kind, layer), k.clone()),
        lambda kind, layer, q: queries.__setitem__((kind, layer), q.clone()),
    ):
        logits = model(ids).logits
    return keys, queries, logits


def _query_by_hand(arch: str, attn, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Pre-RoPE queries (B, T, heads, head_dim) from the projection's input x, written out here
    rather than taken from keyspace.collect.capture: the weights' query rows, then q_norm where it exists."""
    batch, seq = x.shape[:2]
    if arch == "phi3":  # fused [q | k | v] rows
        w = attn.qkv_proj.weight[: heads * head_dim]
        return (x @ w.T).view(batch, seq, heads, head_dim)
    if arch == "gpt_neox":  # per head [q | k | v] rows
        fused = x @ attn.query_key_value.weight.T + attn.query_key_value.bias
        return fused.view(batch, seq, heads, 3, head_dim)[..., 0, :]
    q = x @ attn.q_proj.weight.T
    if attn.q_proj.bias is not None:
        q = q + attn.q_proj.bias
    q = q.view(batch, seq, heads, head_dim)
    if arch == "qwen3":  # RMSNorm over head_dim
        norm = attn.q_norm
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    return q


PROJECTION = {"phi3": "qkv_proj", "gpt_neox": "query_key_value"}


@pytest.mark.parametrize("arch", ARCHS)
def test_queries_equal_projection_and_what_sdpa_receives(arch, monkeypatch):
    model = tiny_model(arch)
    heads, kv_heads, head_dim = head_geometry(model.config)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, 300, (2, 11))
    inputs, sdpa_queries = {}, []
    attns = attention_modules(model, arch_spec(model.config))
    handles = [
        getattr(attn, PROJECTION.get(arch, "q_proj")).register_forward_hook(
            lambda m, i, o, layer=layer: inputs.__setitem__(layer, i[0])
        )
        for layer, attn in enumerate(attns)
    ]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        sdpa_queries.append(query.clone())  # (B, heads, T, D), in layer order
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        reference = model(ids).logits
        sdpa_queries.clear()
        keys, queries, logits = _record_queries(model, ids)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    assert len(attns) == len(sdpa_queries) == layers
    positions = torch.arange(11).expand(2, 11)
    for layer in range(layers):
        pre, post = queries[("pre", layer)], queries[("post", layer)]
        assert pre.shape == post.shape == (2, 11, heads, head_dim)
        by_hand = _query_by_hand(arch, attns[layer], inputs[layer], heads, head_dim)
        torch.testing.assert_close(pre, by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(post, sdpa_queries[layer].transpose(1, 2), rtol=0, atol=0)
        # Post-RoPE queries are HF's RoPE of the pre-RoPE ones (rotated part + pass-through).
        torch.testing.assert_close(post, _apply_hf_rope(model, pre, positions), rtol=0, atol=1e-5)
        assert (post - pre).abs().max() > 1e-3
        assert keys[("pre", layer)].shape == (2, 11, kv_heads, head_dim)


def test_pool_groups_follows_repeat_kv():
    """Query head h joins KV head h // G, the head transformers' repeat_kv pairs it with."""
    from transformers.integrations.sdpa_attention import repeat_kv

    tokens, heads, kv_heads, dim = 5, 6, 2, 4
    group = heads // kv_heads
    queries = torch.randn(tokens, heads, dim)
    pooled = pool_groups(queries, kv_heads)
    assert pooled.shape == (tokens * group, kv_heads, dim)
    tags = torch.arange(kv_heads, dtype=torch.float32).view(1, kv_heads, 1, 1)
    partner = repeat_kv(tags, group).flatten().long()  # KV head of each query head
    for head in range(heads):
        j = int(partner[head])
        found = (pooled[:, j].unsqueeze(1) == queries[:, head].unsqueeze(0)).all(-1)  # (T*G, T)
        assert bool(found.any(0).all()), f"query head {head} missing from KV head {j}"
    for j in range(kv_heads):  # and nothing else: KV head j holds exactly its G heads' vectors
        own = queries[:, partner == j].transpose(0, 1).reshape(-1, dim)
        torch.testing.assert_close(pooled[:, j].sort(0).values, own.sort(0).values, rtol=0, atol=0)
    mha = torch.randn(tokens, 3, dim)
    torch.testing.assert_close(pool_groups(mha, 3), mha, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_restored_after_query_capture_and_after_error(arch):
    model = tiny_model(arch)
    before = _model_state(model)
    with capture_keys(model, lambda *a: None, lambda *a: None):
        assert _model_state(model) != before
    assert _model_state(model) == before
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture_keys(model, lambda *a: None, lambda *a: None),
    ):
        raise RuntimeError("boom")
    assert _model_state(model) == before


def test_model_restored_after_capture_and_after_error():
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    model = tiny_model("llama")
    before = _model_state(model)
    registered = set(AttentionInterface._global_mapping) | set(
        AttentionMaskInterface._global_mapping
    )
    with capture_keys(model, lambda *a: None):
        assert _model_state(model) != before
    assert _model_state(model) == before
    with pytest.raises(RuntimeError, match="boom"), capture_keys(model, lambda *a: None):
        raise RuntimeError("boom")
    assert _model_state(model) == before
    assert (
        set(AttentionInterface._global_mapping) | set(AttentionMaskInterface._global_mapping)
        == registered
    )


def test_eager_model_delegates_to_eager():
    model = tiny_model("llama", attn_implementation="eager")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        reference = model(ids).logits
        got, logits = _record(model, ids)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    assert model.config._attn_implementation == "eager"


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with (
        pytest.raises(KeyspaceError, match="architecture gpt2 is not supported") as err,
        capture_keys(model, lambda *a: None),
    ):
        pass
    assert "llama" in err.value.hint
