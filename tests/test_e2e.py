"""The decode loop (run eagerly on CPU through the reference dispatch), its bucket rule, the byte
floor of the end-to-end bench, and `keyspace bench --e2e` without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from loki_fixtures import HEAD_DIM, random_bases, random_tokens, tiny_llama

from keyspace.loki.graphs import DecodeLoop, DecodeLoopSettings, bucket_end, decode_budget
from keyspace.loki.static_cache import StaticKVCache, StaticLokiCache

BASIS = random_bases(2, 2, seed=5)
# Small buckets and chunks, so a short prompt takes several prefill chunks and crosses buckets.
SETTINGS = DecodeLoopSettings(bucket=4, prefill_chunk=5)


def hf_greedy(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    return out[:, prompt.shape[1] :]


def loop_tokens(model, cache, prompt, new_tokens, settings=SETTINGS):
    with DecodeLoop(model, cache, settings) as loop:
        tokens = loop.generate(prompt, new_tokens)
    assert cache.get_seq_length() == prompt.shape[1] + new_tokens - 1
    return tokens


@pytest.mark.parametrize("prompt_len", [11, 12])  # 11: the last chunk would be one token
def test_eager_loop_equals_transformers_greedy_generate(prompt_len):
    model, prompt = tiny_llama(), random_tokens(batch=2, length=prompt_len)
    tokens = loop_tokens(model, StaticKVCache(2, capacity=32), prompt, 9)
    assert torch.equal(tokens, hf_greedy(model, prompt, 9))
    assert model.config._attn_implementation == "sdpa"


def test_loki_loop_at_k_1_equals_dense():
    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    cache = StaticLokiCache(BASIS, [4, 7], 1.0, capacity=32, group_select=True)
    assert torch.equal(loop_tokens(model, cache, prompt, 9), hf_greedy(model, prompt, 9))


def test_loop_with_one_token_buckets_equals_generate_with_the_static_cache():
    """bucket=1 attends over exactly the valid length: the budget of the dynamic path."""
    from keyspace.loki.decode import cache_kwargs
    from keyspace.loki.graphs import static_attention
    from keyspace.loki.registry import use_attention

    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    cache = StaticLokiCache(BASIS, [3, 5], 0.25, capacity=24)
    with torch.no_grad(), use_attention(model, static_attention(cache)):
        name = "cache" if "cache" in cache_kwargs(model, cache) else "past_key_values"
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False, **{name: cache})
    cache = StaticLokiCache(BASIS, [3, 5], 0.25, capacity=24)
    settings = DecodeLoopSettings(bucket=1, prefill_chunk=64)
    assert torch.equal(loop_tokens(model, cache, prompt, 8, settings), expected[:, 12:])


def test_bucket_rule_rounds_the_budget_up_to_the_bucket_end(monkeypatch):
    import keyspace.kernels

    calls, decode = [], keyspace.kernels.loki_decode

    def spy(q, k_low, k_rest, v, k_top, *args, seqlens=None, **kwargs):
        calls.append((k_low.shape[2], k_top, int(seqlens[0])))
        return decode(q, k_low, k_rest, v, k_top, *args, seqlens=seqlens, **kwargs)

    monkeypatch.setattr(keyspace.kernels, "loki_decode", spy)
    model, prompt = tiny_llama(), random_tokens(batch=1, length=10)
    loop_tokens(model, StaticLokiCache(BASIS, [4, 4], 0.3, capacity=17), prompt, 8)
    for end, k_top, valid in calls:
        assert end == bucket_end(valid, 4, 17) and valid <= end
        assert k_top == min(math.ceil(0.3 * end), end) >= math.ceil(0.3 * valid)
    assert {end for end, _, _ in calls} == {12, 16, 17}  # 17: the bucket is cut at capacity


def test_a_token_budget_is_kept_at_every_bucket(monkeypatch):
    import keyspace.kernels

    calls, decode = [], keyspace.kernels.loki_decode

    def spy(q, k_low, k_rest, v, k_top, *args, **kwargs):
        calls.append((k_low.shape[2], k_top))
        return decode(q, k_low, k_rest, v, k_top, *args, **kwargs)

    monkeypatch.setattr(keyspace.kernels, "loki_decode", spy)
    model, prompt = tiny_llama(), random_tokens(batch=1, length=10)
    cache = StaticLokiCache(BASIS, [4, 4], capacity=17, budget=13)
    loop_tokens(model, cache, prompt, 8)
    assert {(end, k_top) for end, k_top in calls} == {(12, 12), (16, 13), (17, 13)}
    with pytest.raises(ValueError, match="exactly one"):
        StaticLokiCache(BASIS, [4, 4], 0.5, capacity=17, budget=13)


def test_bucket_end_and_budget():
    assert [bucket_end(n, 256, 20_000) for n in (1, 256, 257, 16_385)] == [256, 256, 512, 16_640]
    assert bucket_end(300, 256, 290) == 290
    assert decode_budget(0.125, 16_640) == 2080 and decode_budget(0.1, 30) == 3
    assert decode_budget(1.0, 7) == 7 and decode_budget(0.01, 5) == 1


def test_compiled_layers_keep_tokens_and_restore_the_model():
    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    settings = DecodeLoopSettings(bucket=4, compile="layers", compile_backend="eager")
    layers = list(model.model.layers)
    assert torch.equal(
        loop_tokens(model, StaticKVCache(2, capacity=24), prompt, 6, settings),
        hf_greedy(model, prompt, 6),
    )
    assert (
        list(model.model.layers) == layers
        and model.model.norm.__class__.__name__ != "OptimizedModule"
    )


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_slots_are_the_decoder_layers_and_the_final_norm(arch):
    """The architecture table's paths against what the model's forward runs: its decoder's
    children in call order end with the final norm, and the layers run one after another."""
    from tiny_models import tiny_model

    from keyspace.models.arch import compiled_slots

    model = tiny_model(arch)
    decoder, called = model.get_decoder(), []
    hooks = [m.register_forward_hook(lambda m, *_: called.append(m)) for m in decoder.modules()]
    with torch.no_grad():
        model(random_tokens(batch=1, length=5))
    for hook in hooks:
        hook.remove()
    children = [m for m in called if any(m is c for c in decoder.children())]
    layers = [m for m in called if type(m) is type(called_layer(decoder))]
    slots = compiled_slots(model)
    assert [module for _, _, module in slots[:-1]] == layers
    assert slots[-1][2] is children[-1]  # the last thing the decoder runs: its final norm
    assert all(getattr(parent, name) is module for parent, name, module in slots)


def called_layer(decoder):
    """The first decoder layer, found without the table: the ModuleList child of the decoder."""
    lists = [c for c in decoder.children() if isinstance(c, torch.nn.ModuleList)]
    assert len(lists) == 1
    return lists[0][0]


def test_gpt_neox_runs_the_compiled_loop():
    """compile="layers" with the inductor backend, on GPT-NeoX (other paths than Llama's)."""
    from tiny_models import tiny_model

    model, prompt = tiny_model("gpt_neox"), random_tokens(batch=2, length=10)
    model.generation_config.eos_token_id = None
    settings = DecodeLoopSettings(bucket=4, compile="layers", compile_backend="inductor")
    basis = random_bases(2, 4, seed=2)  # GPT-NeoX: 4 KV heads
    cache = StaticLokiCache(basis, [16, 16], 1.0, capacity=24, group_select=True)
    layers = list(model.gpt_neox.layers)
    assert torch.equal(loop_tokens(model, cache, prompt, 6, settings), hf_greedy(model, prompt, 6))
    assert list(model.gpt_neox.layers) == layers
    assert type(model.gpt_neox.final_layer_norm).__name__ == "LayerNorm"


def test_attention_can_be_skipped_and_the_loop_resumed():
    model, prompt = tiny_llama(), random_tokens(batch=2, length=8)
    cache = StaticKVCache(2, capacity=16)
    with DecodeLoop(model, cache, SETTINGS) as loop:
        first = loop.prefill(prompt)
    with DecodeLoop(model, cache, SETTINGS, attend=False) as loop:
        loop.resume(first, 8)
        loop.step()
        assert loop.tokens().shape == (2, 2) and cache.get_seq_length() == 9
    with pytest.raises(ValueError, match="CUDA graphs"):
        DecodeLoop(model, cache, SETTINGS, graphs=True)


def test_loop_settings_are_checked():
    with pytest.raises(ValueError, match="compile"):
        DecodeLoopSettings(compile="everything")
    with pytest.raises(ValueError, match="compile"):
        DecodeLoopSettings(compile="blocks")  # measured and dropped: docs/notes/e2e-decode.md
    with pytest.raises(ValueError, match="bucket"):
        DecodeLoopSettings(bucket=0)


# --- the end-to-end bench ----------------------------------------------------------------------


def test_byte_floor_matches_a_hand_count():
    from keyspace.bench.shapes import Shape, kv_bytes, model_config, weight_bytes

    shape = Shape.from_config(model_config("llama3-8b"), element_size=2)
    dense = kv_bytes(shape, batch=16, seq=16384)
    assert dense == 32 * 2 * 16 * 8 * 16384 * 128 * 2  # 34.4 GB
    loki = kv_bytes(shape, 16, 16384, d=32, k_top=2048, group_select=True)
    assert loki == 32 * 16 * (8 * 16384 * 32 + 8 * 2048 * (256 - 32)) * 2
    assert loki / dense == pytest.approx(0.234, abs=1e-3)
    per_head = kv_bytes(shape, 16, 16384, d=32, k_top=2048, group_select=False)
    assert per_head == 32 * 16 * (8 * 16384 * 32 + 32 * 2048 * 224) * 2

    model = tiny_llama()  # untied: every weight but the embedding table, plus B rows of it
    params = sum(p.numel() for p in model.parameters())
    assert weight_bytes(model, batch=3) == (params - 128 * 64 + 3 * 64) * 4
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the head reads the table
    params = sum(p.numel() for p in model.parameters())
    assert weight_bytes(model, batch=3) == (params + 3 * 64) * 4


def test_llama3_shape_weights_are_15_gb():
    from keyspace.bench.shapes import model_config

    config = model_config("llama3-8b")
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attention = hidden * (32 * 128) * 2 + hidden * (8 * 128) * 2  # q, o, k, v
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # MLP, two norms
    weights = layers * per_layer + hidden + config.vocab_size * hidden  # final norm, head
    assert weights * 2 / 1e9 == pytest.approx(15.0, abs=0.05)
    assert model_config("llama3-8b", layers=8).num_hidden_layers == 8


def test_e2e_config_and_table():
    from keyspace.bench.e2e import E2EConfig, markdown_table

    with pytest.raises(ValueError, match="exactly one"):
        E2EConfig(config=None)
    with pytest.raises(ValueError, match="config must be"):
        E2EConfig(config="gpt-5")
    with pytest.raises(ValueError, match="bad"):
        E2EConfig(points=((32, 1.5),))
    row = {
        "batch": 16,
        "seq": 16384,
        "method": "loki",
        "d": 32,
        "k": 0.125,
        "prefill_s": 12.0,
        "step_ms": 9.1,
        "tokens_per_s": 1758.0,
        "floor_ms": 5.41,
        "floor_pct": 59.0,
        "attention_ms": 3.5,
        "attention_floor_ms": 1.9,
        "rest_ms": 5.6,
        "rest_floor_ms": 3.5,
        "speedup_vs_dense": 1.5,
    }
    table = markdown_table([row]).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[2].count("|")
    assert "Loki d=32 k=0.125" in table[2] and "1.50×" in table[2] and "–" in table[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_e2e_needs_cuda():
    from typer.testing import CliRunner

    from keyspace.cli.main import app

    result = CliRunner().invoke(app, ["bench", "--e2e", "--seq", "4096"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("Error: keyspace bench --e2e needs a CUDA GPU")
    assert sum(line.startswith("Error:") for line in lines) == 1
    result = CliRunner().invoke(app, ["bench", "--e2e", "--config", "gpt-5"])
    assert result.exit_code == 2 and "config must be one of" in result.output


def test_the_bases_fit_the_model_they_decode():
    from keyspace.models.arch import head_geometry

    model = tiny_llama()
    _, kv_heads, head_dim = head_geometry(model.config)
    assert head_dim == HEAD_DIM
    assert BASIS.shape == (model.config.num_hidden_layers, kv_heads, head_dim, head_dim)


# --- prefill with a bounded workspace, the query rotation, the batch rows -----------------------


def attention_oracle(query, keys, values, scale):
    """Causal attention in float64, the queries being the last T of S positions: (B, T, Hq, D)."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = (t.double().repeat_interleave(groups, dim=1) for t in (keys, values))
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    logits = query.double() @ keys.transpose(-1, -2) * scale  # [B, Hq, T, S]
    future = torch.arange(kv_len)[None, :] > torch.arange(kv_len - q_len, kv_len)[:, None]
    weights = logits.masked_fill(future, float("-inf")).softmax(-1)
    return (weights @ values).transpose(1, 2)


@pytest.mark.parametrize("q_len", [7, 19])  # a later chunk; the whole sequence
@pytest.mark.parametrize("workspace", [1, 1 << 30])  # one KV head per call; all at once
def test_prefill_attention_reads_the_cache_in_slices_and_is_exact(q_len, workspace):
    from keyspace.loki.prefill import prefill_attention

    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 6, q_len, 8, generator=gen)
    keys, values = torch.randn(2, 3, 19, 8, generator=gen), torch.randn(2, 3, 19, 8, generator=gen)
    expected = attention_oracle(query, keys, values, 0.3)
    for parts in ((keys,), (keys[..., :3], keys[..., 3:])):  # dense; Loki's (low, rest)
        out = prefill_attention(query, parts, values, 0.3, workspace)
        assert out.shape == (2, q_len, 6, 8) and out.is_contiguous()
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_prefill_chunks_and_attention_slices_are_bounded(monkeypatch):
    import keyspace.loki.prefill as prefill
    from keyspace.loki.prefill import chunk_length, heads_per_slice

    assert [chunk_length(b, 8192, 16384) for b in (1, 4, 16, 64)] == [8192, 4096, 1024, 256]
    assert chunk_length(100_000, 8192, 16384) == 2
    per_head = 2 * 16 * 4 * 16384 * 128 * 2  # B=16, G=4, 16k, D=128, fp16: 512 MiB
    assert heads_per_slice(16, 4, 16384, 128, 2, 8, 1 << 30) == 2 == (1 << 30) // per_head
    assert heads_per_slice(16, 4, 32768, 128, 2, 8, 1 << 30) == 1  # never fewer than one head
    assert heads_per_slice(16, 1, 32768, 128, 2, 32, 1) == 32  # MHA repeats nothing

    shapes, sdpa = [], prefill.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        shapes.append((q.shape[2], q.shape[1], k.shape[1]))
        return sdpa(q, k, v, **kwargs)

    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    expected = hf_greedy(model, prompt, 4)
    monkeypatch.setattr(prefill.F, "scaled_dot_product_attention", spy)  # torch's: the loop's
    settings = DecodeLoopSettings(
        bucket=4, prefill_chunk=64, prefill_tokens=10, prefill_workspace=1
    )
    tokens = loop_tokens(model, StaticKVCache(2, capacity=24), prompt, 4, settings)
    assert torch.equal(tokens, expected)
    prefill_calls = [s for s in shapes if s[0] > 1]
    # chunks of 10 // 2 = 5 tokens (the last 2); each call one KV head's 2 query heads, its K/V
    # in place (the first chunk) or repeated to those 2 heads: never the whole cache's
    assert {s[0] for s in prefill_calls} == {5, 2}
    assert {s[1:] for s in prefill_calls} == {(2, 1), (2, 2)}


def test_bmm_query_rotation_gives_the_einsum_tokens():
    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    tokens = []
    for rotation in ("einsum", "bmm"):
        settings = DecodeLoopSettings(bucket=4, prefill_chunk=5, query_rotation=rotation)
        cache = StaticLokiCache(BASIS, [4, 7], 0.5, capacity=32, group_select=True)
        tokens.append(loop_tokens(model, cache, prompt, 9, settings))
    assert torch.equal(tokens[0], tokens[1])
    settings = DecodeLoopSettings(bucket=4, prefill_chunk=5, query_rotation="bmm")
    cache = StaticLokiCache(BASIS, [4, 7], 1.0, capacity=32, group_select=True)
    assert torch.equal(loop_tokens(model, cache, prompt, 9, settings), hf_greedy(model, prompt, 9))
    with pytest.raises(ValueError, match="query_rotation"):
        DecodeLoopSettings(query_rotation="fold")


def test_the_table_shows_each_batch_and_the_peak():
    from keyspace.bench.e2e import markdown_table

    rows = [
        {
            "batch": b,
            "seq": 4096,
            "method": "dense",
            "step_ms": 5.0,
            "tokens_per_s": 200.0 * b,
            "floor_ms": 4.0,
            "floor_pct": 80.0,
            "peak_gb": 20.0 + b,
        }
        for b in (1, 4, 16)
    ]
    lines = markdown_table(rows).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1", "4", "16"]
    assert "peak GB" in lines[0] and lines[-1].rstrip().endswith("| 36.0 |")
