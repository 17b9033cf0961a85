"""Fused q/k/v and gate/up projections (keyspace.loki.fused): the same logits as transformers' own
forward in float32 on every architecture, and the model bit-identical afterwards, also on error;
the decode loop with fusion against the loop without; the bench's memory estimate and its one-line
Error."""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import random_bases, random_tokens
from tiny_models import tiny_model

from keyspace.loki.fused import FusedInput, ProjectionSlice, fused_projections, fusion_groups
from keyspace.models.arch import ARCHITECTURES, arch_spec, decoder_layers

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"]
FUSED = {"llama", "mistral", "qwen2", "qwen3"}  # Phi3 and GPT-NeoX ship fused projections


def snapshot(model):
    """Everything that must come back: each state_dict tensor (values, dtype) and each module's type."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    types = [(name, type(m)) for name, m in model.named_modules()]
    params = {name: id(p) for name, p in model.named_parameters()}
    return state, types, params


def assert_restored(model, before):
    state, types, params = snapshot(model)
    assert types == before[1] and params == before[2]
    assert state.keys() == before[0].keys()
    for name, tensor in state.items():
        assert tensor.dtype == before[0][name].dtype and torch.equal(tensor, before[0][name]), name
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # each Parameter owns its storage again


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_logits_equal_the_models_own_and_the_model_comes_back(arch):
    model = tiny_model(arch)
    tokens = random_tokens(batch=2, length=9, vocab=model.config.vocab_size)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(tokens).logits
        with fused_projections(model) as groups:
            assert groups == (2 * model.config.num_hidden_layers if arch in FUSED else 0)
            fused = model(tokens).logits
            if arch in FUSED:
                layer = decoder_layers(model)[0]
                spec = arch_spec(model.config)
                assert isinstance(getattr(layer, spec.attention), FusedInput)
                assert isinstance(getattr(layer, spec.mlp).inner.gate_proj, ProjectionSlice)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert_restored(model, before)


def test_fused_weights_take_the_originals_place_in_memory():
    model = tiny_model("llama")
    attention = decoder_layers(model)[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    with fused_projections(model):
        fused = decoder_layers(model)[0].self_attn.weight
        assert q.weight.data_ptr() == fused.data_ptr()
        assert k.weight.data_ptr() == fused[q.out_features].data_ptr()
        assert torch.equal(fused[-v.out_features :], v.weight)


def test_the_model_comes_back_when_the_body_raises():
    model = tiny_model("qwen2")  # q/k/v biases
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), fused_projections(model):
        raise RuntimeError("boom")
    assert_restored(model, before)


def test_a_row_naming_no_linear_is_refused_and_nothing_is_left_fused(monkeypatch):
    import dataclasses

    model = tiny_model("llama")
    before = snapshot(model)
    row = dataclasses.replace(ARCHITECTURES["llama"], gate_up=("gate_proj", "no_such_proj"))
    monkeypatch.setitem(ARCHITECTURES, "llama", row)
    with pytest.raises(ValueError, match="no nn.Linear"), fused_projections(model):
        pass
    assert_restored(model, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_rows_name_the_models_projections(arch):
    model = tiny_model(arch)
    spec, layer = arch_spec(model.config), decoder_layers(tiny_model(arch))[0]
    attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
    for owner, names in ((attention, (*spec.qkv, spec.output)), (mlp, (*spec.gate_up, spec.down))):
        assert all(isinstance(getattr(owner, n), torch.nn.Linear) for n in names)
    assert len(fusion_groups(model)) == (4 if arch in FUSED else 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_loop_gives_the_same_tokens_fused_and_unfused(arch):
    from keyspace.loki.graphs import DecodeLoop, DecodeLoopSettings
    from keyspace.loki.static_cache import StaticLokiCache

    model = tiny_model(arch)
    model.generation_config.eos_token_id = None
    prompt = random_tokens(batch=2, length=11, vocab=model.config.vocab_size)
    before, tokens = snapshot(model), []
    heads, dim = model.config.num_key_value_heads, 16  # head_dim of both tiny configs
    for fuse in (True, False):
        settings = DecodeLoopSettings(bucket=4, prefill_chunk=5, fuse_projections=fuse)
        cache = StaticLokiCache(random_bases(2, heads, dim, seed=1), [6, 9], 0.5, capacity=24)
        with DecodeLoop(model, cache, settings) as loop:
            tokens.append(loop.generate(prompt, 7))
    assert torch.equal(tokens[0], tokens[1])
    assert_restored(model, before)


# --- the bench's memory estimate ----------------------------------------------------------------


def test_b16_at_16k_fits_an_80_gb_card_and_32k_needs_the_h200():
    from keyspace.bench.e2e import E2EConfig, check_memory
    from keyspace.bench.shapes import memory_need, model_config
    from keyspace.loki.graphs import DecodeLoopSettings

    config, loop = model_config("llama3-8b"), DecodeLoopSettings()
    need = memory_need(config, 2, batch=16, seq=16384, capacity=16640, loop=loop)
    assert need.weights == 8_030_261_248 * 2  # Llama-3-8B's parameters
    assert need.kv_cache == 32 * 2 * 16 * 8 * 16640 * 128 * 2
    assert need.prefill < 6e9 and need.total < 79e9  # an H100 80GB has ~84 GB free
    old = memory_need(config, 2, 16, 16384, 16640, DecodeLoopSettings(prefill_tokens=16 * 8192))
    assert old.prefill > 3 * need.prefill  # the B=16 × 8192-token chunk that ran out of memory
    check_memory(E2EConfig(batches=(1, 4, 16), seqs=(4096, 16384), steps=64), 84e9)
    with pytest.raises(Exception, match=r"B=16 S=32768 needs 9\d\.\d GB"):
        check_memory(E2EConfig(batches=(16,), seqs=(16384, 32768)), 84e9)
    check_memory(E2EConfig(batches=(16,), seqs=(32768,)), 140e9)  # the H200


def test_bench_e2e_says_in_one_error_line_what_a_shape_needs(monkeypatch):
    from typer.testing import CliRunner

    from keyspace.cli.main import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30e9, 80e9))
    args = ["bench", "--e2e", "--batch", "1", "--batch", "4", "--batch", "16", "--seq", "16384"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert sum(line.startswith("Error:") for line in lines) == 1
    error = next(line for line in lines if line.startswith("Error:"))
    assert "B=16 S=16384 needs 57." in error and "30.0 GB free" in error
