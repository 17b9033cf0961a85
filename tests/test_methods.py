"""The method registry: every registered method, through one set of checks.

A new method registers itself in keyspace/loki/methods/ and is picked up here without an edit.
"""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import HEAD_DIM, logits_of, random_bases, random_tokens, tiny_llama

from keyspace.errors import KeyspaceError
from keyspace.loki import METHODS, SparseSettings, get_method, register_method
from keyspace.loki.masked import layer_inputs
from keyspace.loki.methods import DECODE_PATHS, Method, Style, default_methods
from keyspace.loki.methods.base import loki_cost

LAYERS, KV_HEADS, Q_HEADS = 2, 2, 4
ALL = sorted(METHODS)


def settings(name: str, k: float = 0.25, k_mode: str = "window", d: int = 4, **extra):
    """SparseSettings for `name` with what it uses: d, a random orthonormal basis, random sigma."""
    spec = get_method(name)
    basis = random_bases(LAYERS, KV_HEADS, seed=1)
    scale = torch.rand(LAYERS, KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    return SparseSettings(
        name,
        k=k if spec.uses_k else None,
        k_mode=k_mode,
        dims=torch.full((LAYERS, KV_HEADS), d) if spec.uses_d else None,
        basis=basis if spec.uses_basis else None,
        key_scale=scale + 0.5 if spec.uses_key_scale else None,
        **extra,
    )


def inputs_for(spec_settings, q_len=12, kv_heads=KV_HEADS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, Q_HEADS, q_len, HEAD_DIM, generator=gen)
    key = torch.randn(1, kv_heads, q_len, HEAD_DIM, generator=gen)
    return layer_inputs(spec_settings, 0, query, key, HEAD_DIM**-0.5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k_mode", ["window", "row"])
def test_every_method_returns_causal_logits_keeping_its_budget(name, k_mode):
    spec = get_method(name)
    inputs = inputs_for(settings(name, k_mode=k_mode))
    logits = spec.select(inputs)
    assert logits.shape == (1, Q_HEADS, 12, 12)
    kept = torch.isfinite(logits)
    assert not (kept & ~inputs.causal).any()
    expected = inputs.budget if spec.top_k else inputs.causal.sum(-1)
    assert (kept.sum(-1) == expected).all()
    # the kept logits are the exact scores, except for a method that attends on its own scores
    if name != "pcaattn":
        torch.testing.assert_close(logits[kept], inputs.exact_scores[kept])


@pytest.mark.parametrize("name", [n for n in ALL if get_method(n).uses_group])
def test_group_select_keeps_one_token_set_per_kv_head(name):
    kept = torch.isfinite(get_method(name).select(inputs_for(settings(name, group_select=True))))
    assert torch.equal(kept[:, 0], kept[:, 1]) and torch.equal(kept[:, 2], kept[:, 3])


@pytest.mark.parametrize("name", ALL)
def test_every_method_at_k1_and_full_rank_is_transformers_own_attention(name):
    """Nothing dropped, nothing approximated: the logits of HF's eager attention."""
    model, tokens = tiny_llama(), random_tokens()
    reference = logits_of(tiny_llama(attn="eager"), tokens)
    got = logits_of(model, tokens, settings(name, k=1.0, d=HEAD_DIM))
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in ALL if get_method(n).top_k])
def test_every_top_k_method_differs_from_full_at_a_small_budget(name):
    """So the k=1 check above is not vacuous: the budget reaches every top-k method."""
    model, tokens = tiny_llama(), random_tokens()
    sparse = logits_of(model, tokens, settings(name, k=0.125, d=2))
    assert (sparse - logits_of(model, tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_every_method_is_complete(name):
    spec = METHODS[name]
    assert spec.name == name and spec.decode in DECODE_PATHS
    assert 0 < spec.kv_bytes_fraction(HEAD_DIM, 4 if spec.uses_d else None, 0.125) <= 1
    assert spec.style.label and spec.style.marker and spec.style.color.startswith("#")


def test_styles_are_distinct_and_reports_read_them():
    from keyspace.reports.validate_figures import method_style

    styles = [(m.style.color, m.style.marker) for m in METHODS.values()]
    assert len(set(styles)) == len(styles)
    names = list(METHODS)
    assert [method_style(n, names) for n in names] == styles
    assert method_style("unregistered", [*names, "unregistered"])[1] == "X"


@pytest.mark.parametrize(
    "name, d, k, reads",  # values read per token per head, of a dense step's 2·D
    [
        ("full", None, None, 2 * HEAD_DIM),
        ("loki", 4, 0.125, 4 + 2 * 0.125 * HEAD_DIM),
        ("loki-adaptive", 4, 0.125, 4 + 2 * 0.125 * HEAD_DIM),
        ("sparq", 8, 0.25, 8 + 2 * 0.25 * HEAD_DIM),
        ("exact-topk", None, 0.25, HEAD_DIM + 0.25 * HEAD_DIM),
        ("pcaattn", 4, None, 4 + HEAD_DIM),
        ("h2o", None, 0.25, 2 * 0.25 * HEAD_DIM),
        ("streaming", None, 0.25, 2 * 0.25 * HEAD_DIM),
    ],
)
def test_kv_bytes_of_each_method(name, d, k, reads):
    assert get_method(name).kv_bytes_fraction(HEAD_DIM, d, k) == pytest.approx(
        reads / (2 * HEAD_DIM)
    )


def test_adaptive_reads_r_s_plus_2_k_s_d():
    """(r·S + 2·k·S·D) / (2·S·D), at a real shape."""
    seq, head_dim, r, k = 4096, 128, 16, 1 / 16
    expected = (r * seq + 2 * k * seq * head_dim) / (2 * seq * head_dim)
    assert get_method("loki-adaptive").kv_bytes_fraction(head_dim, r, k) == pytest.approx(expected)


def test_register_refuses_a_second_method_of_the_same_name():
    style = Style("#000001", "o", "x")
    twin = Method("loki", get_method("loki").select, loki_cost, "cache", style, uses_k=True)
    with pytest.raises(ValueError, match="already registered"):
        register_method(twin)
    assert METHODS["loki"] is not twin


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyspaceError) as err:
        get_method("lokii")
    assert "lokii" in err.value.message and all(n in err.value.hint for n in METHODS)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"name": "a,b"}, "no comma"),
        ({"decode": "teleport"}, "decode must be"),
        ({"uses_k": False}, "uses k"),
    ],
)
def test_a_method_checks_its_fields(fields, message):
    base = dict(name="new", select=get_method("loki").select, cost=loki_cost, decode="masked-row")
    base |= {"style": Style("#000001", "o", "x"), "uses_k": True} | fields
    with pytest.raises(ValueError, match=message):
        Method(**base)


def test_the_default_grid_is_the_papers_comparison_in_its_order():
    """`keyspace validate` without --methods runs what it ran before adaptive Loki existed."""
    assert default_methods() == (
        "loki", "full", "exact-topk", "h2o", "pcaattn", "sparq", "streaming",
    )  # fmt: skip
    assert set(METHODS) - set(default_methods()) == {"loki-adaptive"}


def test_validate_methods_come_from_the_registry():
    from keyspace.validate.config import ValidateConfig
    from keyspace.validate.grid import parse_methods

    assert parse_methods(ValidateConfig.__dataclass_fields__["methods"].default) == list(
        default_methods()
    )
    assert parse_methods("loki-adaptive,default,loki") == ["loki-adaptive", *default_methods()]
    with pytest.raises(KeyspaceError) as err:
        parse_methods("loki,adaptive")
    assert "loki-adaptive" in err.value.hint


def test_task_decoders_follow_the_decode_path():
    """h2o's path keeps running sums between steps; every other masked path is one masked row."""
    from keyspace.tasks import decoders

    for name, spec in METHODS.items():
        if spec.decode in ("masked-row", "heavy-hitters"):
            decoder = decoders.masked_decoder(settings(name))
            inner = "_heavy_hitters_decoder" if spec.decode == "heavy-hitters" else "_row_decoder"
            assert decoder.__qualname__.startswith(inner), name


MASKED_PATHS = [n for n in ALL if get_method(n).decode in ("masked-row", "heavy-hitters")]


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", MASKED_PATHS)
def test_every_masked_decode_path_steps_as_the_whole_sequence_reference(prompt_ids, name):
    """One row per step against the cache = re-running the whole sequence with the prompt dense;
    at k = 1 and d = D both are dense greedy decoding."""
    from keyspace.tasks import cache_decoder, masked_decoder

    model = tiny_llama()
    sparse = settings(name, k=0.2, d=2, group_select=get_method(name).uses_group)
    rows = masked_decoder(sparse)(model, prompt_ids, 5)
    assert torch.equal(rows, masked_decoder(sparse, whole_sequence=True)(model, prompt_ids, 5))
    dense = cache_decoder()(model, prompt_ids, 5)
    if get_method(name).top_k:  # the selection bites, so the agreement means something
        assert not torch.equal(rows, dense)
    exact = masked_decoder(settings(name, k=1.0, d=HEAD_DIM))(model, prompt_ids, 5)
    assert torch.equal(exact, dense)
