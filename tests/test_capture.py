"""Capture records pre/post-RoPE keys per KV head, leaves logits alone, and restores the model."""

import sys

import pytest
import torch
from tiny_models import tiny_model

from keyspace.capture import ARCHITECTURES, capture_keys, head_geometry
from keyspace.errors import KeyspaceError

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
