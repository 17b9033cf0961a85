"""Decode mode: LokiCache + the kernels' decode step inside transformers' generate()."""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import HEAD_DIM, random_bases, random_tokens, tiny_llama, tiny_tokenizer
from transformers import DynamicCache

from keyspace.loki.cache import LokiCache
from keyspace.loki.decode import cache_kwargs, greedy, loki_decoding
from keyspace.loki.masked import SparseSettings, masked_attention
from keyspace.validate.evaluate import decode_check
from keyspace.validate.passkey import ANSWER_TOKENS, passkey_prompts, run_passkey

BASIS = random_bases(2, 2, seed=5)


def generate(model, prompt, cache=None, new_tokens=8):
    kwargs = (
        {}
        if cache is None
        else {"cache" if "cache" in cache_kwargs(model, cache) else "past_key_values": cache}
    )
    with torch.no_grad():
        if cache is None:
            return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        with loki_decoding(model, cache):
            return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def test_generate_with_full_rank_loki_cache_matches_dense():
    model, prompt = tiny_llama(), random_tokens(batch=1, length=12)
    cache = LokiCache(BASIS, [HEAD_DIM, HEAD_DIM], k=1.0)
    assert torch.equal(generate(model, prompt, cache), generate(model, prompt))
    assert cache.get_seq_length() == 12 + 8 - 1
    assert model.config._attn_implementation == "sdpa"


def test_cache_stores_rotated_keys_split_at_d():
    model, prompt = tiny_llama(), random_tokens(batch=1, length=10)
    dense, loki = DynamicCache(), LokiCache(BASIS, [4, 7], k=0.5)
    with torch.no_grad():
        model(prompt, **cache_kwargs(model, dense))
        with loki_decoding(model, loki):
            model(prompt, **cache_kwargs(model, loki))
    for layer, d in enumerate((4, 7)):
        cached = loki.layers[layer]
        assert cached.k_low.shape == (1, 2, 10, d) and cached.k_rest.shape == (
            1,
            2,
            10,
            HEAD_DIM - d,
        )
        back = torch.einsum("bhse,hed->bhsd", cached.rotated_keys(), BASIS[layer])  # rotate back
        torch.testing.assert_close(back, dense.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.values, dense.layers[layer].values)


def test_decode_step_equals_masked_row_mode_on_one_layer():
    """With one layer, the last token's logits depend only on layer-0 keys: decode == masked mode (row)."""
    model, tokens = tiny_llama(layers=1), random_tokens(batch=1, length=21)
    basis, d, k = random_bases(1, 2, seed=2), 3, 0.25
    with (
        torch.no_grad(),
        masked_attention(
            model,
            SparseSettings("loki", k=k, k_mode="row", dims=torch.full((1, 2), d), basis=basis),
        ),
    ):
        masked_logits = model(tokens, use_cache=False).logits[0, -1]
    cache = LokiCache(basis, [d], k=k)
    with torch.no_grad(), loki_decoding(model, cache):
        model(tokens[:, :-1], **cache_kwargs(model, cache))
        decode_logits = model(tokens[:, -1:], **cache_kwargs(model, cache)).logits[0, -1]
    torch.testing.assert_close(decode_logits, masked_logits, atol=1e-5, rtol=1e-4)
    dense_logits = model(tokens).logits[0, -1]
    assert (decode_logits - dense_logits).abs().max() > 1e-4  # the budget really bit


@pytest.mark.parametrize(("k", "budget", "kept"), [(0.25, None, 6), (None, 4, 4), (None, 50, 22)])
def test_a_decode_step_keeps_the_fraction_or_the_token_budget(k, budget, kept):
    """22 cached tokens at the step: ceil(0.25 · 22) = 6; a budget of 4 keeps 4; one past the
    length keeps all. The step equals masked mode's last row with that many tokens (k = kept/22)."""
    model, tokens = tiny_llama(layers=1), random_tokens(batch=1, length=22)
    basis, d = random_bases(1, 2, seed=2), 3
    cache = LokiCache(basis, [d], k=k, budget=budget)
    assert cache.tokens_kept(22) == kept and cache.tokens_kept(1) == 1
    with torch.no_grad(), loki_decoding(model, cache):
        model(tokens[:, :-1], **cache_kwargs(model, cache))
        step = model(tokens[:, -1:], **cache_kwargs(model, cache)).logits[0, -1]
    same = SparseSettings(
        "loki", k=kept / 22, k_mode="row", dims=torch.full((1, 2), d), basis=basis
    )
    with torch.no_grad(), masked_attention(model, same):
        masked = model(tokens, use_cache=False).logits[0, -1]
    torch.testing.assert_close(step, masked, atol=1e-5, rtol=1e-4)


def test_decode_check_is_exact_at_full_rank_and_reports_disagreement_at_low_rank():
    model, prompts = tiny_llama(), random_tokens(batch=2, length=10)
    exact = decode_check(model, prompts, 6, lambda: LokiCache(BASIS, [HEAD_DIM] * 2, k=1.0))
    assert exact.token_agreement == 1.0 and exact.nll_sparse == pytest.approx(
        exact.nll_dense, rel=1e-5
    )
    rough = decode_check(model, prompts, 6, lambda: LokiCache(BASIS, [1, 1], k=0.1))
    assert rough.nll_sparse != pytest.approx(rough.nll_dense, rel=1e-6)


def test_greedy_loop_equals_generate():
    model, prompt = tiny_llama(), random_tokens(batch=1, length=9)
    tokens, _ = greedy(model, DynamicCache(), prompt, 5)
    assert torch.equal(tokens, generate(model, prompt, new_tokens=5)[0, 9:])


def test_crop_and_bad_settings():
    cache = LokiCache(BASIS, [4, 4], k=0.5)
    model = tiny_llama()
    with torch.no_grad(), loki_decoding(model, cache):
        model(random_tokens(batch=1, length=8), **cache_kwargs(model, cache))
    cache.crop(5)
    assert cache.get_seq_length() == 5 and cache.layers[1].k_rest.shape[-2] == 5
    with pytest.raises(ValueError, match="k must be"):
        LokiCache(BASIS, [4, 4], k=0.0)
    with pytest.raises(ValueError, match="d must be"):
        LokiCache(BASIS, [0, 4], k=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        LokiCache(BASIS, [4, 4])
    with pytest.raises(ValueError, match="budget must be"):
        LokiCache(BASIS, [4, 4], budget=0)
    with pytest.raises(ValueError, match="one d per layer"):
        LokiCache(BASIS, [4], k=0.5)


def test_model_restored_when_decoding_raises():
    model = tiny_llama()
    with (
        pytest.raises(RuntimeError, match="boom"),
        loki_decoding(model, LokiCache(BASIS, [4, 4], k=0.5)),
    ):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_passkey_prompts_have_exact_length_and_hold_the_key():
    tokenizer = tiny_tokenizer()
    prompts = passkey_prompts(tokenizer, 96, 3)
    assert [p.depth for p in prompts] == pytest.approx([1 / 6, 0.5, 5 / 6])
    for p in prompts:
        assert p.ids.shape == (1, 96 - ANSWER_TOKENS)
        assert p.key in tokenizer.decode(p.ids[0].tolist()).replace(" ", "")
    model = tiny_llama()
    correct = run_passkey(
        model,
        tokenizer,
        prompts[:1],
        {"full": None, "loki": lambda: LokiCache(BASIS, [4, 4], k=0.25)},
    )
    assert set(correct) == {"full", "loki"} and all(c in (0, 1) for c in correct.values())


def test_group_select_decode_step_equals_masked_group_row_mode():
    model, tokens = tiny_llama(layers=1), random_tokens(batch=1, length=21)
    basis, d, k = random_bases(1, 2, seed=4), 4, 0.25
    settings = SparseSettings(
        "loki", k=k, k_mode="row", dims=torch.full((1, 2), d), basis=basis, group_select=True
    )
    with torch.no_grad(), masked_attention(model, settings):
        masked_logits = model(tokens, use_cache=False).logits[0, -1]
    cache = LokiCache(basis, [d], k=k, group_select=True)
    with torch.no_grad(), loki_decoding(model, cache):
        model(tokens[:, :-1], **cache_kwargs(model, cache))
        decode_logits = model(tokens[:, -1:], **cache_kwargs(model, cache)).logits[0, -1]
    torch.testing.assert_close(decode_logits, masked_logits, atol=1e-5, rtol=1e-4)


def test_found_reads_the_key_from_generated_tokens():
    from keyspace.validate.passkey import found

    tokenizer = tiny_tokenizer()
    answer = torch.tensor(tokenizer(" 12345 .", add_special_tokens=False).input_ids)
    assert found(tokenizer, answer, "12345") and not found(tokenizer, answer, "12346")


def test_dense_handler_matches_the_models_own_attention():
    from keyspace.loki.decode import dense_handler
    from keyspace.loki.registry import use_attention

    model, prompt = tiny_llama(), random_tokens(batch=3, length=24)
    with torch.no_grad():
        ours, theirs = DynamicCache(), DynamicCache()
        with use_attention(model, dense_handler):
            prefill = model(prompt, **cache_kwargs(model, ours)).logits
            step = model(prompt[:, -1:], **cache_kwargs(model, ours)).logits
        assert torch.allclose(
            prefill, model(prompt, **cache_kwargs(model, theirs)).logits, atol=1e-5
        )
        reference = model(prompt[:, -1:], **cache_kwargs(model, theirs)).logits
        assert torch.allclose(step, reference, atol=1e-5)
        # A chunk of several rows after a cached prefix takes the explicit causal mask.
        chunk = model(prompt[:, :5], **cache_kwargs(model, theirs)).logits
        with use_attention(model, dense_handler):
            assert torch.allclose(
                model(prompt[:, :5], **cache_kwargs(model, ours)).logits, chunk, atol=1e-5
            )
