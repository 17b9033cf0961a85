"""Loki with a query-aware basis: keys through A, queries through B = A^-T, so q~·k~ = q·k.

The paper's PCA basis is the special case B = A (orthonormal). Everything Loki runs through
(masked mode, LokiCache, StaticLokiCache, the decode loop, the fp16 kernels) takes the pair.
"""

from __future__ import annotations

import pytest
import torch
from loki_fixtures import HEAD_DIM, random_bases, random_tokens, tiny_llama
from transformers import DynamicCache

from keyspace.kernels import (
    loki_decode,
    lowrank_scores_reference,
    select_topk_reference,
    sparse_attention_reference,
)
from keyspace.loki.cache import LokiCache
from keyspace.loki.decode import cache_kwargs, loki_decoding
from keyspace.loki.graphs import DecodeLoop, DecodeLoopSettings, static_attention
from keyspace.loki.masked import SparseSettings, masked_attention
from keyspace.loki.methods.common import rotate
from keyspace.loki.registry import use_attention
from keyspace.loki.static_cache import StaticLokiCache

LAYERS, KV_HEADS = 2, 2
FP16_TOL = {"atol": 4e-3, "rtol": 4e-3}  # tests/test_kernels.py's fp16 tolerance
# max |q~·k~ - q·k| / max |q·k| after rounding q~ and k~: a few units of each dtype's roundoff
SCORE_REL_ERR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def invertible_pair(layers=LAYERS, kv_heads=KV_HEADS, dim=HEAD_DIM, seed=0):
    """A random invertible key transform A (condition number 10) and B = A^-T, float32."""
    gen = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(layers, kv_heads, dim, dim, generator=gen).double())
    right, _ = torch.linalg.qr(torch.randn(layers, kv_heads, dim, dim, generator=gen).double())
    spread = torch.logspace(-0.5, 0.5, dim, dtype=torch.float64)
    a = left @ torch.diag_embed(spread.expand(layers, kv_heads, dim)) @ right
    return a.float(), torch.linalg.inv(a).mT.float()


BASES = {
    "key": (random_bases(LAYERS, KV_HEADS, seed=5), None),
    "query-aware": invertible_pair(seed=5),
}


def dims(d: int = HEAD_DIM, layers: int = LAYERS) -> torch.Tensor:
    return torch.full((layers, KV_HEADS), d, dtype=torch.long)


def assert_rel_close(actual, expected, rel=1e-4):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err < rel, f"relative error {err:.2e}"


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("method", ["loki", "pcaattn"])
def test_masked_mode_at_full_rank_and_k1_reproduces_full_in_both_bases(basis, method):
    model, tokens = tiny_llama(), random_tokens()
    key_t, query_t = BASES[basis]
    settings = SparseSettings(method, k=1.0, dims=dims(), basis=key_t, query_basis=query_t)
    with torch.no_grad():
        dense = model(tokens, use_cache=False).logits
        with masked_attention(model, settings):
            assert_rel_close(model(tokens, use_cache=False).logits, dense)


def test_the_query_transform_is_what_makes_scores_exact():
    """At d = D, A for both sides is not exact when A is not orthonormal; B = A^-T is."""
    model, tokens = tiny_llama(), random_tokens()
    key_t, query_t = BASES["query-aware"]
    with torch.no_grad():
        dense = model(tokens, use_cache=False).logits
        for query_basis, exact in ((query_t, True), (None, False)):
            settings = SparseSettings("pcaattn", dims=dims(), basis=key_t, query_basis=query_basis)
            with masked_attention(model, settings):
                err = (model(tokens, use_cache=False).logits - dense).abs().max()
            assert (err < 1e-4 * dense.abs().max()) == exact


def test_settings_and_caches_check_the_query_transform_shape():
    key_t, query_t = BASES["query-aware"]
    with pytest.raises(ValueError, match="query_basis"):
        SparseSettings("loki", dims=dims(), basis=key_t, query_basis=query_t[:1])
    with pytest.raises(ValueError, match="query_basis"):
        SparseSettings("sparq", dims=dims(), query_basis=query_t)
    with pytest.raises(ValueError, match="query_basis"):
        LokiCache(key_t, [4, 4], 0.5, query_basis=query_t[:, :1])
    with pytest.raises(ValueError, match="query_basis"):
        StaticLokiCache(key_t, [4, 4], 0.5, capacity=8, query_basis=query_t[:1])


def static_generate(model, prompt, cache, new_tokens=8):
    name = "cache" if "cache" in cache_kwargs(model, cache) else "past_key_values"
    handler = (
        loki_decoding(model, cache)
        if isinstance(cache, LokiCache)
        else use_attention(model, static_attention(cache))
    )
    with torch.no_grad(), handler:
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, **{name: cache})


def make_cache(kind: str, basis: str, d: int, k: float, capacity: int = 32):
    key_t, query_t = BASES[basis]
    if kind == "dynamic":
        return LokiCache(key_t, [d] * LAYERS, k, query_basis=query_t)
    return StaticLokiCache(key_t, [d] * LAYERS, k, capacity, query_basis=query_t)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_generate_at_full_rank_and_k1_equals_dense_in_both_bases(kind, basis):
    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    with torch.no_grad():
        dense = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(
        static_generate(model, prompt, make_cache(kind, basis, HEAD_DIM, 1.0)), dense
    )
    # Logits too, prefill (dense in the transformed space) and a decode step (the kernels' path).
    tokens, cache = random_tokens(batch=1, length=13), make_cache(kind, basis, HEAD_DIM, 1.0)
    handler = (
        loki_decoding(model, cache)
        if kind == "dynamic"
        else use_attention(model, static_attention(cache))
    )
    with torch.no_grad():
        reference = model(tokens).logits[0, -2:]
        with handler:
            prefill = model(tokens[:, :-1], **cache_kwargs(model, cache)).logits[0, -1]
            step = model(tokens[:, -1:], **cache_kwargs(model, cache)).logits[0, -1]
    assert_rel_close(prefill, reference[0])
    assert_rel_close(step, reference[1])


def test_decode_loop_with_the_query_aware_cache_at_k1_equals_dense():
    """The loop's chunked prefill and its per-query-head transform (keyspace.loki.graphs)."""
    model, prompt = tiny_llama(), random_tokens(batch=2, length=12)
    with torch.no_grad():
        dense = model.generate(prompt, max_new_tokens=9, do_sample=False)[:, 12:]
    cache = make_cache("static", "query-aware", HEAD_DIM, 1.0)
    with DecodeLoop(model, cache, DecodeLoopSettings(bucket=4, prefill_chunk=5)) as loop:
        assert torch.equal(loop.generate(prompt, 9), dense)


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_decode_step_equals_the_masked_row_with_the_query_aware_basis(group_select):
    """One layer: the last token's logits depend on layer-0 keys only, so decode == masked (row)."""
    model, tokens = tiny_llama(layers=1), random_tokens(batch=1, length=21)
    key_t, query_t = invertible_pair(layers=1, seed=2)
    d, k = 3, 0.25
    settings = SparseSettings(
        "loki", k, "row", dims(d, 1), key_t, group_select=group_select, query_basis=query_t
    )
    with torch.no_grad(), masked_attention(model, settings):
        masked_logits = model(tokens, use_cache=False).logits[0, -1]
    for cache in (
        LokiCache(key_t, [d], k, group_select=group_select, query_basis=query_t),
        StaticLokiCache(key_t, [d], k, 32, group_select=group_select, query_basis=query_t),
    ):
        handler = (
            loki_decoding(model, cache)
            if isinstance(cache, LokiCache)
            else use_attention(model, static_attention(cache))
        )
        with torch.no_grad(), handler:
            model(tokens[:, :-1], **cache_kwargs(model, cache))
            decode_logits = model(tokens[:, -1:], **cache_kwargs(model, cache)).logits[0, -1]
        torch.testing.assert_close(decode_logits, masked_logits, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        dense_logits = model(tokens).logits[0, -1]
    assert (decode_logits - dense_logits).abs().max() > 1e-4  # the budget really bit


def test_the_cache_stores_keys_through_a_and_values_untouched():
    model, prompt = tiny_llama(), random_tokens(batch=1, length=10)
    key_t, query_t = BASES["query-aware"]
    dense, cache = DynamicCache(), LokiCache(key_t, [4, 7], 0.5, query_basis=query_t)
    with torch.no_grad():
        model(prompt, **cache_kwargs(model, dense))
        with loki_decoding(model, cache):
            model(prompt, **cache_kwargs(model, cache))
    for layer, ours in enumerate(cache.layers):
        keys = dense.layers[layer].keys
        torch.testing.assert_close(ours.rotated_keys(), rotate(keys, key_t[layer]))
        torch.testing.assert_close(ours.values, dense.layers[layer].values)


# --- range and precision with a realistic, ill-conditioned query moment ---------------------------


def score_transforms(key_cov, query_moment, rel_floor=1e-6):
    """Independent construction of the query-aware pair: A = U^T S^1/2, B = U^T S^-1/2, with U the
    eigenvectors (descending) of S^1/2 C S^1/2 and S's eigenvalues floored at rel_floor · max."""
    lam, vec = torch.linalg.eigh(query_moment)
    lam = lam.clamp(min=rel_floor * lam.max(dim=-1, keepdim=True).values)
    root = vec @ torch.diag_embed(lam.sqrt()) @ vec.mT
    inv_root = vec @ torch.diag_embed(lam.rsqrt()) @ vec.mT
    _, u = torch.linalg.eigh(root @ key_cov @ root)
    u = u.flip(-1)
    return u.mT @ root, u.mT @ inv_root


def realistic_head(dim=64, groups=3, seq=1027, seed=0):
    """Queries and keys shaped like a real head: S_q's eigenvalues span 10^2.5 .. 10^-3 with a
    mean, keys have a large mean on a few coordinates and a decaying spectrum. float64."""
    gen = torch.Generator().manual_seed(seed)

    def factor(eigenvalues):
        rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        return rot @ torch.diag(eigenvalues.sqrt()) @ rot.T

    lq = factor(torch.logspace(2.5, -3, dim, dtype=torch.float64))
    lk = factor(torch.logspace(1.7, -2, dim, dtype=torch.float64))
    mean_q = 2 * torch.randn(dim, generator=gen, dtype=torch.float64)
    mean_k = torch.zeros(dim, dtype=torch.float64)
    mean_k[:3] = torch.tensor([25.0, -15.0, 10.0])
    queries = mean_q + torch.randn(groups, dim, generator=gen, dtype=torch.float64) @ lq
    keys = mean_k + torch.randn(seq, dim, generator=gen, dtype=torch.float64) @ lk
    key_t, query_t = score_transforms(lk @ lk, lq @ lq + torch.outer(mean_q, mean_q))
    return queries, keys, key_t, query_t


def realistic_cache(kv_heads=2, groups=3, seq=1027):
    """q~ (1, Hq, D), k~ (1, Hkv, S, D), and the originals, float64, over `kv_heads` heads."""
    heads = [realistic_head(groups=groups, seq=seq, seed=h) for h in range(kv_heads)]
    q, k, a, b = (torch.stack(parts) for parts in zip(*heads, strict=True))
    q_t = torch.einsum("hgd,hed->hge", q, b).reshape(1, kv_heads * groups, -1)
    k_t = torch.einsum("hsd,hed->hse", k, a)[None]
    return q_t, k_t, q.reshape(1, kv_heads * groups, -1), k[None], a


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_transformed_keys_stay_in_range_and_keep_scores(dtype):
    q_t, k_t, q, k, key_t = realistic_cache()
    assert torch.linalg.cond(key_t).min() > 100  # ill-conditioned: not an orthonormal basis
    rounded_keys = rotate(k.to(dtype), key_t.float())  # the caches' path: fp32 math, dtype out
    assert rounded_keys.dtype == dtype and torch.isfinite(rounded_keys).all()
    assert rounded_keys.abs().max() < torch.finfo(dtype).max / 64  # far from overflow
    groups = q.shape[1] // k.shape[1]
    exact = torch.einsum("bhd,bhsd->bhs", q, k.repeat_interleave(groups, 1))
    approx = torch.einsum(
        "bhd,bhsd->bhs",
        q_t.to(dtype).double(),
        k_t.to(dtype).double().repeat_interleave(groups, 1),
    )
    assert (approx - exact).abs().max() / exact.abs().max() < SCORE_REL_ERR[dtype]


@pytest.mark.parametrize("group_select", [False, True], ids=["per_head", "group"])
def test_fp16_kernels_with_a_query_aware_cache_match_the_fp32_oracle(group_select):
    q_t, k_t, _, _, _ = realistic_cache()
    d, k_top, scale = 16, 129, 64**-0.5
    q, k_low, k_rest = (
        q_t.half(),
        k_t[..., :d].half().contiguous(),
        k_t[..., d:].half().contiguous(),
    )
    v = torch.randn(k_t.shape, generator=torch.Generator().manual_seed(1)).half()
    out = loki_decode(
        q, k_low, k_rest, v, k_top, scale=scale, group_select=group_select, backend="triton"
    )
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    idx = select_topk_reference(lowrank_scores_reference(q, k_low, group_select), k_top)
    up = [t.float() for t in (q, k_low, k_rest, v)]
    torch.testing.assert_close(out.float(), sparse_attention_reference(*up, idx, scale), **FP16_TOL)


# --- validate --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from loki_fixtures import synthetic_model_run

    root = tmp_path_factory.mktemp("query-basis")
    return root, synthetic_model_run(root)


def test_validate_without_query_transforms_is_one_error_naming_the_capture(synthetic):
    from typer.testing import CliRunner

    from keyspace.cli.main import app

    root, run = synthetic
    args = ["validate", "--run", str(run), "--dataset", str(root / "corpus.txt"), "--d", "4"]
    result = CliRunner().invoke(app, [*args, "--basis", "key,query-aware"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and "no query-aware basis" in result.stderr
    assert "--capture keys,queries" in result.stderr and "keyspace analyze" in result.stderr
    assert "Traceback" not in result.output


def with_query_aware_calibration(run, destination):
    """A copy of `run` whose calibration also holds a query-aware pair per kind (random invertible
    A, B = A^-T), and whose ranks.json holds score ranks at 0.9, sealed as analyze seals them."""
    import shutil

    from keyspace.analyze.pca import write_ranks
    from keyspace.runfolder.analysis import read_calibration, read_ranks

    shutil.copytree(run, destination)
    calibration = read_calibration(destination)
    for seed, kind in enumerate(("pre", "post")):
        key_t, query_t = invertible_pair(seed=7 + seed)
        calibration.score_key_transform[kind] = key_t
        calibration.score_query_transform[kind] = query_t
        calibration.score_eigenvalues[kind] = calibration.eigenvalues[kind].clone()
    ranks = read_ranks(destination)
    ranks["calibration_sha256"] = calibration.save(destination / "calibration.safetensors")
    for kind in ("pre", "post"):
        ranks[kind]["score_rank_at"] = {"0.9": [[2, 3], [4, 5]]}
    write_ranks(destination, ranks)
    return destination


def test_validate_compares_both_bases_in_one_run(synthetic, tmp_path):
    """loki and pcaattn run once per basis, labeled; at d = D and k = 1 every basis is exact."""
    import json

    from typer.testing import CliRunner

    from keyspace.cli.main import app

    root, run = synthetic
    run = with_query_aware_calibration(run, tmp_path / "run")
    args = ["validate", "--run", str(run), "--dataset", str(root / "corpus.txt"), "--window", "64"]
    args += ["--max-tokens", "128", "--d", f"{HEAD_DIM},auto:0.9", "--k", "1.0"]
    args += ["--methods", "loki,pcaattn,sparq,full,loki-adaptive", "--basis", "key,query-aware"]
    args += ["--decode-prompts", "1", "--decode-prompt-tokens", "32", "--decode-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["basis"] == ["key", "query-aware"]
    rows = {(r["method"], r["basis"], r["d"]): r for r in doc["results"]}
    assert set(rows) == {
        (method, basis, d)
        for method in ("loki", "pcaattn", "loki-adaptive")
        for basis in ("key", "query-aware")
        for d in (HEAD_DIM, "auto:0.9")
    } | {("sparq", None, HEAD_DIM), ("sparq", None, "auto:0.9"), ("full", None, None)}
    full = rows[("full", None, None)]["ppl"]
    for basis in ("key", "query-aware"):
        for method in ("loki", "pcaattn", "loki-adaptive"):
            assert rows[(method, basis, HEAD_DIM)]["ppl"] == pytest.approx(full, rel=1e-4)
        adaptive = rows[("loki-adaptive", basis, "auto:0.9")]
        assert adaptive["d_mean"] == rows[("loki", basis, "auto:0.9")]["d_mean"]
        assert (
            adaptive["kv_bytes_fraction"] == rows[("loki", basis, "auto:0.9")]["kv_bytes_fraction"]
        )
    # auto:0.9 takes the key ranks under the key basis and the score ranks under query-aware
    assert rows[("loki", "key", "auto:0.9")]["d_mean"] == (4 + 6 + 9 + 13) / 4
    assert rows[("loki", "query-aware", "auto:0.9")]["d_mean"] == (2 + 3 + 4 + 5) / 4
    recall = {(e["basis"], e["d"]): e for e in doc["recall"]}
    assert set(recall) == {(b, d) for b in ("key", "query-aware") for d in (HEAD_DIM, "auto:0.9")}
    entry = recall[("query-aware", "auto:0.9")]
    assert entry["score_rank"] == [[2, 2, 3, 3], [4, 4, 5, 5]]  # each query head: its KV head's
    assert entry["rank"] == [[4, 4, 6, 6], [9, 9, 13, 13]]
    assert {"spearman_score_rank_vs_mass", "spearman_rank_vs_mass"} <= set(entry)
    decode = {(e["basis"], e["d"]): e for e in doc["decode"]}
    assert decode[("query-aware", HEAD_DIM)]["token_agreement"] == 1.0
    assert decode[("key", HEAD_DIM)]["token_agreement"] == 1.0
    quick = [*args[:9], "--d", "4", "--methods", "loki", "--basis", "key,query-aware"]
    table = CliRunner().invoke(app, [*quick, "--decode-prompts", "0", "--out", str(tmp_path / "o")])
    assert (
        table.exit_code == 0 and "query-aware" in table.stdout and "score rank@90" in table.stdout
    )


def test_validate_notes_prompts_longer_than_the_calibration_windows_under_the_query_aware_basis(
    synthetic, tmp_path
):
    """The run's windows are 64 tokens: a 96-token task under the query-aware basis gets one note
    naming the --window to collect with; the key basis gets none."""
    import json

    from typer.testing import CliRunner

    from keyspace.cli.main import app

    root, run = synthetic
    run = with_query_aware_calibration(run, tmp_path / "run")
    args = ["validate", "--run", str(run), "--dataset", str(root / "corpus.txt"), "--window", "64"]
    args += ["--max-tokens", "64", "--d", "4", "--k", "0.25", "--methods", "loki"]
    args += ["--decode-prompts", "0", "--recall-windows", "0", "--tasks", "niah"]
    args += ["--task-lengths", "96", "--task-count", "1", "--task-batch", "1"]

    def run_with(*extra):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        return result

    noted = run_with("--basis", "key,query-aware", "--out", str(tmp_path / "qa"))
    text = " ".join(noted.stderr.split())  # the console wraps at the terminal's width
    assert text.count("Note:") == 1
    note = text[text.index("Note:") :]
    assert "calibrated on 64-token windows" in note and "96 tokens" in note
    assert "--window 64,96" in note and f"--out {run}-w64+96" in note and "keyspace analyze" in note
    doc = json.loads((tmp_path / "qa" / "validate.json").read_text())
    assert doc["calibration_window"] == 64
    assert "calibrated on 64-token windows" in (tmp_path / "qa" / "validate.html").read_text()
    key_only = run_with("--basis", "key", "--out", str(tmp_path / "key"))
    assert "Note:" not in key_only.stderr


def test_collect_again_keeps_the_runs_model_and_corpus_and_asks_for_at_least_one_window(synthetic):
    import shlex

    from keyspace.runfolder.analysis import collect_again
    from keyspace.runfolder.store import RunFolder

    _, run = synthetic
    manifest = RunFolder.open(run).manifest
    text = collect_again(manifest, "/tmp/new run", window=4096)
    collect, analyze = (part.strip("`") for part in text.split(", then "))
    words = shlex.split(collect)
    flags = dict(zip(words[2::2], words[3::2], strict=True))
    assert words[:2] == ["keyspace", "collect"]
    assert flags["--model"] == manifest.model_spec
    assert flags["--dataset"] == manifest.dataset_spec
    assert flags["--window"] == "4096" and flags["--out"] == "/tmp/new run"
    assert int(flags["--max-tokens"]) == 4096  # the run has fewer tokens than one such window
    assert flags["--capture"] == "keys,queries"
    assert shlex.split(analyze) == ["keyspace", "analyze", "/tmp/new run"]


@pytest.mark.parametrize(
    "bases, methods, tasks, task_lengths, passkey_lengths, noted",
    [
        (("query-aware",), ["loki"], ("niah",), (96,), (), 96),
        (("query-aware",), ["loki"], ("niah",), (64,), (), None),  # within the window
        (("query-aware",), ["loki"], (), (96,), (), None),  # no task stage: its lengths do not run
        (("query-aware",), ["loki"], (), (1024,), (128, 80), 128),  # the longest passkey
        (("key",), ["loki"], ("niah",), (96,), (), None),
        (("key", "query-aware"), ["full", "sparq"], ("niah",), (96,), (), None),  # no Loki
    ],
)
def test_calibration_window_note_only_for_query_aware_loki_beyond_the_window(
    bases, methods, tasks, task_lengths, passkey_lengths, noted
):
    from types import SimpleNamespace

    from keyspace.validate.inputs import calibration_window_note

    manifest = SimpleNamespace(
        model_spec="m",
        dataset_spec="c.txt",
        dataset_split=None,
        window=64,
        tokens=256,
        max_tokens=None,
        lengths=(64,),
        window_label="64",
    )  # the fields of runfolder.manifest.Manifest that collect_again and the note read
    run = SimpleNamespace(manifest=manifest, path="runs/r", window=64)
    inputs = SimpleNamespace(bases=bases, methods=methods, tasks=tasks, run=run)
    config = SimpleNamespace(task_lengths=task_lengths, passkey_lengths=passkey_lengths)
    note = calibration_window_note(inputs, config)
    if noted is None:
        assert note is None
    else:
        assert note.startswith("Note: the query-aware basis was calibrated on 64-token windows")
        assert f"has {noted} tokens" in note and f"--window 64,{noted}" in note
        assert f"--out runs/r-w64+{noted}" in note and "keyspace analyze runs/r-w" in note
        assert "in one run" in note


def test_calibration_window_note_names_every_length_and_compares_with_the_longest():
    """A run of --window 32,64: the note says 32+64-token windows; 64 tokens need no note."""
    from types import SimpleNamespace

    from keyspace.validate.inputs import calibration_window_note

    manifest = SimpleNamespace(
        model_spec="m", dataset_spec="c.txt", dataset_split=None, window=64, tokens=512,
        max_tokens=512, lengths=(32, 64), window_label="32+64",
    )  # fmt: skip
    run = SimpleNamespace(manifest=manifest, path="runs/r", window=64)
    inputs = SimpleNamespace(bases=("query-aware",), methods=["loki"], tasks=("niah",), run=run)
    config = SimpleNamespace(task_lengths=(64,), passkey_lengths=())
    assert calibration_window_note(inputs, config) is None
    note = calibration_window_note(inputs, SimpleNamespace(task_lengths=(96,), passkey_lengths=()))
    assert note.startswith("Note: the query-aware basis was calibrated on 32+64-token windows")
    assert "--window 32,96 " in note and "has 96 tokens" in note
