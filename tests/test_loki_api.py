"""`keyspace.Loki`, the one way in: `attach(model)` around the model's own `generate`, the fast
`loki.generate`, `from_run` on a collected and analyzed run, and its one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from loki_fixtures import random_bases
from tiny_models import VOCAB, save_tiny_model, tiny_model, write_corpus

from keyspace import Loki
from keyspace.errors import KeyspaceError
from keyspace.models.arch import head_geometry

ARCHS = ["llama", "qwen2", "gpt_neox"]
README = Path(__file__).resolve().parents[1] / "README.md"


def model_and_basis(arch: str):
    """A tiny model whose generate never stops early, and random orthonormal bases that fit it."""
    model = tiny_model(arch)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    _, kv_heads, head_dim = head_geometry(model.config)
    layers = model.config.num_hidden_layers
    return model, random_bases(layers, kv_heads, head_dim, seed=3), head_dim


def prompts(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def dense_generate(model, ids, new_tokens: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def state_of(model) -> dict:
    """What attach may touch: the instance's attributes, the attention, the weights."""
    return {
        "dict": dict(model.__dict__),
        "attn": model.config._attn_implementation,
        "generate": type(model).generate,
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_untouched(model, before: dict) -> None:
    assert "generate" not in model.__dict__
    assert model.generate.__func__ is before["generate"]
    assert model.config._attn_implementation == before["attn"]
    assert model.__dict__.keys() == before["dict"].keys()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before["weights"].items())


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_full_budget_loki_gives_the_dense_tokens(arch):
    model, basis, head_dim = model_and_basis(arch)
    ids = prompts()  # a batch of two unpadded prompts
    dense = dense_generate(model, ids, 8)
    loki = Loki.from_tensors(basis, d=head_dim, k=1.0)
    with loki.attach(model):
        attached = dense_generate(model, ids, 8)
    assert torch.equal(attached, dense)
    assert torch.equal(loki.generate(model, ids, max_new_tokens=8), dense)
    budget = Loki.from_tensors(basis, d=head_dim, budget=10_000)  # a budget past the length
    assert torch.equal(budget.generate(model, ids, max_new_tokens=8), dense)


def test_sparse_loki_differs_from_dense_and_both_paths_agree():
    model, basis, _ = model_and_basis("llama")
    ids = prompts(length=40)
    loki = Loki.from_tensors(basis, d=2, k=0.1, group_select=True)
    with loki.attach(model):
        attached = dense_generate(model, ids, 10)
    assert torch.equal(loki.generate(model, ids, max_new_tokens=10), attached)
    assert not torch.equal(attached, dense_generate(model, ids, 10))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_the_cuda_path_gives_the_reference_paths_tokens(arch):
    """`generate`'s CUDA path (static cache + DecodeLoop), run eagerly here: with one-token buckets
    its budget is the reference path's exactly, so a sparse setting gives the same tokens."""
    from keyspace.loki.graphs import DecodeLoopSettings

    model, basis, _ = model_and_basis(arch)
    ids = prompts(length=20)
    loki = Loki.from_tensors(basis, d=3, k=0.3)
    settings = DecodeLoopSettings(bucket=1, prefill_chunk=8)
    static = loki._graph_loop(model, ids, 7, settings)
    assert torch.equal(static, loki.generate(model, ids, max_new_tokens=7)[:, 20:])


def test_attach_takes_generates_own_arguments():
    model, basis, head_dim = model_and_basis("qwen2")
    ids = prompts(batch=3)
    loki = Loki.from_tensors(basis, d=head_dim // 2, k=0.5)
    with loki.attach(model):
        torch.manual_seed(0)
        sampled = model.generate(
            ids, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=0.7, top_k=20
        )
        torch.manual_seed(0)
        again = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=True,
            top_p=0.9,
            temperature=0.7,
            top_k=20,
        )
        several = model.generate(ids[:1], max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (3, 18) and torch.equal(sampled, again)  # a fresh cache per call
    assert several.shape == (2, 16)


def test_attach_leaves_the_model_untouched_also_on_error():
    model, basis, head_dim = model_and_basis("llama")
    before = state_of(model)
    loki = Loki.from_tensors(basis, d=head_dim, k=1.0)
    with loki.attach(model):
        assert "generate" in model.__dict__
        dense_generate(model, prompts(), 3)
    assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="boom"), loki.attach(model):
        dense_generate(model, prompts(), 2)
        raise RuntimeError("boom")
    assert_untouched(model, before)
    with pytest.raises(KeyspaceError, match="unpadded"), loki.attach(model):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :3] = 0  # a left-padded row
        model.generate(prompts(), attention_mask=mask, max_new_tokens=2)
    assert_untouched(model, before)
    assert torch.equal(dense_generate(model, prompts(), 3)[:, :12], prompts())


def test_attach_refuses_a_second_cache_and_a_model_it_does_not_fit():
    from transformers import DynamicCache

    model, basis, head_dim = model_and_basis("llama")
    loki = Loki.from_tensors(basis, d=head_dim)
    with pytest.raises(KeyspaceError, match="cache is Loki's"), loki.attach(model):
        model.generate(prompts(), past_key_values=DynamicCache(), max_new_tokens=2)
    with pytest.raises(KeyspaceError, match="does not fit") as err:
        with loki.attach(tiny_model("gpt_neox")):
            pass
    assert "calibration" in err.value.hint


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d": 0}, "d must be in"),
        ({"d": 17}, "d must be in"),
        ({"d": [4, 4, 4]}, "the basis has 2 layers"),
        ({"d": "16"}, "d must be an int"),
        ({"d": 4, "k": 0.0}, "k must be in"),
        ({"d": 4, "k": 1.5}, "k must be in"),
        ({"d": 4, "k": 0.5, "budget": 64}, "exactly one"),
        ({"d": 4, "budget": 0}, "budget must be"),
    ],
)
def test_bad_arguments_are_keyspace_errors_with_a_hint(kwargs, message):
    with pytest.raises(KeyspaceError, match=message) as err:
        Loki.from_tensors(random_bases(2, 2), **kwargs)
    assert err.value.hint


def test_bad_tensors_are_keyspace_errors():
    basis = random_bases(2, 2)
    with pytest.raises(KeyspaceError, match="query_basis"):
        Loki.from_tensors(basis, 4, query_basis=basis[:, :1])
    with pytest.raises(KeyspaceError, match="basis must be"):
        Loki.from_tensors(basis[0], 4)
    loki = Loki.from_tensors(basis, [4, 8])
    assert loki.layer_dims == [4, 8] and loki.k == 0.125 and loki.budget is None
    per_head = Loki.from_tensors(basis, torch.tensor([[2, 5], [3, 1]]))
    assert per_head.layer_dims == [5, 3]  # a layer splits at the largest d of its heads
    assert "d=1..5, k=0.125" in repr(per_head)
    assert per_head.cache().layers[0].d == 5
    assert per_head.static_cache(None, capacity=8).layers[1].d == 3
    with pytest.raises(KeyspaceError, match="max_new_tokens"):
        Loki.from_tensors(basis, 4).generate(
            tiny_model("llama", num_hidden_layers=2), prompts(), max_new_tokens=0
        )


# --- from_run, on a collected and analyzed tiny run ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Llama (head_dim 32) saved to a folder, collected with queries and analyzed."""
    from keyspace.analyze.pca import analyze_and_write
    from keyspace.collect.runner import CollectConfig, collect

    root = tmp_path_factory.mktemp("loki-api")
    model_dir = save_tiny_model(root / "tiny-llama", head_dim=32)
    cfg = CollectConfig(
        model=str(model_dir),
        dataset=str(write_corpus(root / "corpus.txt")),
        out=root / "runs" / "smol-wiki",
        window=32,
        max_tokens=32 * 8,
        keep_keys="none",
    )
    analyze_and_write(collect(cfg).out)
    return root, model_dir, cfg.out


def loaded(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None
    return model


def test_from_run_reads_the_verified_calibration_and_ranks(tiny_run):
    from keyspace.runfolder.analysis import read_calibration, read_ranks

    _, model_dir, run = tiny_run
    calibration, ranks = read_calibration(run), read_ranks(run)
    loki = Loki.from_run(run, d=32, k=1.0)
    assert torch.equal(loki.basis, calibration.components["post"]) and loki.query_basis is None
    auto = Loki.from_run(run, d="auto:0.9", kind="pre")
    assert torch.equal(loki.dims.new_tensor(ranks["pre"]["rank_at"]["0.9"]).clamp(min=1), auto.dims)
    assert torch.equal(auto.basis, calibration.components["pre"]) and auto.k == 0.125
    aware = Loki.from_run(run, d="auto:0.9", basis="query-aware", budget=16)
    key_t, query_t = calibration.score_transforms("post")
    assert torch.equal(aware.basis, key_t) and torch.equal(aware.query_basis, query_t)
    assert torch.equal(aware.dims, torch.tensor(ranks["post"]["score_rank_at"]["0.9"]).clamp(min=1))
    assert aware.budget == 16 and aware.k is None

    model, ids = loaded(model_dir), prompts(length=10)
    dense = dense_generate(model, ids, 6)
    for exact in (loki, Loki.from_run(run, d=32, k=1.0, basis="query-aware")):
        with exact.attach(model):
            assert torch.equal(dense_generate(model, ids, 6), dense)
        assert torch.equal(exact.generate(model, ids, max_new_tokens=6), dense)


def test_from_run_adaptive_carries_the_calibrations_sigma(tiny_run):
    """select="adaptive": σ = sqrt of the key eigenvalues (key basis) or of the score eigenvalues
    (query-aware); at r = D and k = 1 both decode the dense tokens, through attach and generate."""
    from keyspace.runfolder.analysis import read_calibration

    _, model_dir, run = tiny_run
    calibration = read_calibration(run)
    model, ids = loaded(model_dir), prompts(length=10)
    dense = dense_generate(model, ids, 5)
    spectra = {"key": calibration.eigenvalues, "query-aware": calibration.score_eigenvalues}
    for basis, eigenvalues in spectra.items():
        loki = Loki.from_run(run, d=32, k=1.0, basis=basis, select="adaptive")
        assert loki.select == "adaptive" and loki.d_max == 32
        torch.testing.assert_close(loki.key_scale, eigenvalues["post"].clamp_min(0).sqrt())
        with loki.attach(model):
            assert torch.equal(dense_generate(model, ids, 5), dense)
        assert torch.equal(loki.generate(model, ids, max_new_tokens=5), dense)
    narrow = Loki.from_run(run, d=4, budget=3, select="adaptive", d_max=8)
    assert narrow.cache().layers[0].sigma.shape == (narrow.basis.shape[1], 8)
    assert Loki.from_run(run, d=4).key_scale is None  # fixed d carries no σ


@pytest.mark.parametrize(
    ("kwargs", "message", "hint"),
    [
        ({"select": "both"}, "select must be one of", "adaptive"),
        ({"d": 8, "select": "adaptive", "d_max": 4}, "d_max must be an int in", "d_max"),
        ({"d": "auto:0.42"}, "no post rank_at at τ=0.42", "--threshold 0.42"),
        ({"d": "auto:x"}, "not an integer or auto", "auto:0.9"),
        ({"d": 64}, "d must be in", "between 1 and 32"),
        ({"basis": "values"}, "basis must be one of", "query-aware"),
        ({"kind": "mid"}, "kind must be one of", "post"),
        ({"k": 2.0}, "k must be in", "k=0.125"),
    ],
)
def test_from_run_bad_arguments(tiny_run, kwargs, message, hint):
    _, _, run = tiny_run
    with pytest.raises(KeyspaceError, match=message) as err:
        Loki.from_run(run, **kwargs)
    assert hint in err.value.hint


def test_from_run_of_a_folder_that_is_no_analyzed_run(tmp_path, tiny_run):
    with pytest.raises(KeyspaceError, match="does not exist"):
        Loki.from_run(tmp_path / "missing")
    import shutil

    copy = tmp_path / "unanalyzed"
    shutil.copytree(tiny_run[2], copy)
    for name in ("ranks.json", "calibration.safetensors"):
        (copy / name).unlink()
    with pytest.raises(KeyspaceError, match="no analysis") as err:
        Loki.from_run(copy)
    assert "keyspace analyze" in err.value.hint


# --- the README's example, run as written -------------------------------------------------------


def readme_example() -> str:
    """The README's Python block that attaches Loki to a model."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [block for block in blocks if ".attach(model)" in block]
    assert len(found) == 1, "README.md should hold one ```python block with loki.attach(model)"
    return found[0]


def test_readme_example_runs_as_written(tiny_run, monkeypatch, capsys):
    root, model_dir, _ = tiny_run
    code = readme_example()
    assert len(code.strip().splitlines()) <= 10
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id in code and "runs/smol-wiki" in code
    monkeypatch.chdir(root)  # the example's run folder, runs/smol-wiki, is this test's run
    namespace: dict = {}
    exec(compile(code.replace(hub_id, str(model_dir)), str(README), "exec"), namespace)
    assert isinstance(namespace["loki"], Loki) and namespace["out"].shape[1] > 5
    assert capsys.readouterr().out.strip()
