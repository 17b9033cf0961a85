"""The RULER-style task suite: exact lengths, seeded depths, answers in the prompt, scoring, decoders."""

from __future__ import annotations

import collections
import itertools
import re

import pytest
import torch
from loki_fixtures import random_bases, tiny_llama, tiny_tokenizer
from transformers import DynamicCache

from keyspace.errors import KeyspaceError
from keyspace.loki import SparseSettings, row_budgets
from keyspace.loki.cache import LokiCache
from keyspace.loki.decode import greedy
from keyspace.tasks import (
    FILLER,
    TASKS,
    bootstrap_interval,
    cache_decoder,
    exact_match,
    load_haystack,
    make_prompts,
    masked_decoder,
    recall,
    run_tasks,
    wilson_interval,
)
from keyspace.tasks.haystack import snap

# Byte-level tokens: a long enough length holds every task's fixed text; cwe's list needs the most.
LENGTHS = {name: (1800, 2500, 3001) for name in TASKS}
LENGTHS["cwe"] = (3000, 4097)
NEEDLE = re.compile(r" One of the special magic \w+s for [\w-]+ is: [\w-]+\.")


def byte_tokenizer():
    """A tokenizer with one token per UTF-8 byte: exact round trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def text_of(tokenizer, prompt) -> str:
    return tokenizer.decode(prompt.ids[0].tolist())


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_has_its_exact_length(tokenizer, task):
    for length in LENGTHS[task]:
        prompts = make_prompts(task, tokenizer, length, 3, seed=1)
        assert [tuple(p.ids.shape) for p in prompts] == [
            (1, length - TASKS[task].answer_tokens)
        ] * 3


@pytest.mark.parametrize("task", ["niah", "mk-niah", "vt", "fwe"])
def test_exact_lengths_with_a_word_level_tokenizer(task):
    prompts = make_prompts(task, tiny_tokenizer(), 600, 2)
    assert {p.ids.shape[1] for p in prompts} == {600 - TASKS[task].answer_tokens}


@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_are_reproducible_and_seeded(tokenizer, task):
    length = LENGTHS[task][0]
    first, again = (make_prompts(task, tokenizer, length, 2, seed=3) for _ in range(2))
    other = make_prompts(task, tokenizer, length, 2, seed=4)
    assert all(
        torch.equal(a.ids, b.ids) and a.answers == b.answers
        for a, b in zip(first, again, strict=True)
    )
    assert [p.answers for p in first] != [p.answers for p in other]


@pytest.mark.parametrize("task", list(TASKS))
def test_the_answers_are_in_the_prompt(tokenizer, task):
    for prompt in make_prompts(task, tokenizer, LENGTHS[task][0], 3, haystack="pydoc"):
        text = text_of(tokenizer, prompt)
        assert all(answer in text for answer in prompt.answers), (task, prompt.answers)


@pytest.mark.parametrize(
    ("task", "needles", "answers"),
    [("niah", 1, 1), ("mk-niah", 4, 1), ("mv-niah", 4, 4), ("mq-niah", 4, 4)],
)
def test_needle_counts_and_the_asked_values(tokenizer, task, needles, answers):
    prompt = make_prompts(task, tokenizer, 2500, 1)[0]
    found = NEEDLE.findall(text_of(tokenizer, prompt))
    assert len(found) == needles
    assert len(prompt.answers) == answers == len(set(prompt.answers))
    asked = [n for n in found if n.rstrip(".").rsplit(" ", 1)[1] in prompt.answers]
    assert len(asked) == answers


@pytest.mark.parametrize(
    ("kind", "pattern"), [("niah-word", r"[a-z]+"), ("niah-uuid", r"[0-9a-f-]{36}")]
)
def test_needle_value_kinds(tokenizer, kind, pattern):
    for prompt in make_prompts(kind, tokenizer, 2500, 3):
        assert re.fullmatch(pattern, prompt.answers[0])
    assert re.fullmatch(r"\d{7}", make_prompts("niah", tokenizer, 2500, 1)[0].answers[0])


def test_needle_depths_spread_evenly_and_land_between_sentences(tokenizer):
    prompts = make_prompts("niah", tokenizer, 3000, 4, haystack="filler")
    assert [p.depth for p in prompts] == [0.125, 0.375, 0.625, 0.875]
    for prompt in prompts:
        text = text_of(tokenizer, prompt)
        start, end = text.index("\n") + 1, text.rindex("\nWhat is")
        at = NEEDLE.search(text).start()
        body = end - start - len(NEEDLE.search(text).group())
        assert abs((at - start) / body - prompt.depth) < 0.02
        assert text[at - 1] == "."  # after a sentence of the filler


def test_real_text_haystack_needles_follow_a_sentence_end(tokenizer):
    for prompt in make_prompts("mk-niah", tokenizer, 3000, 3, haystack="pydoc"):
        text = text_of(tokenizer, prompt)
        assert FILLER not in text
        for match in NEEDLE.finditer(text):
            assert text[match.start() - 1] in ".!?\n" or match.start() == text.index("\n") + 1


def test_variable_tracking_chain_is_in_order(tokenizer):
    prompt = make_prompts("vt", tokenizer, 2500, 1)[0]
    text = text_of(tokenizer, prompt)
    names = prompt.answers
    value = re.search(rf"VAR {names[0]} = (\d+)\.", text).group(1)
    places = [text.index(f"VAR {b} = VAR {a}.") for a, b in itertools.pairwise(names)]
    assert places == sorted(places) and text.index(f"VAR {names[0]} = {value}") < places[0]
    assert f"assigned the value {value}" in text


def test_common_words_are_the_most_common(tokenizer):
    prompt = make_prompts("cwe", tokenizer, 3000, 1)[0]
    entries = re.findall(r" (\d+)\. ([a-z]+)", text_of(tokenizer, prompt))
    assert [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
    counts = collections.Counter(word for _, word in entries)
    least_common = min(counts[w] for w in prompt.answers)
    assert len(prompt.answers) == 10
    assert all(n < least_common for w, n in counts.items() if w not in prompt.answers)


def test_frequent_words_are_the_most_frequent(tokenizer):
    prompt = make_prompts("fwe", tokenizer, 2500, 1)[0]
    body = text_of(tokenizer, prompt).split("\n")[1]
    ranked = [w for w, _ in collections.Counter(body.split()).most_common(3)]
    assert sorted(ranked) == sorted(prompt.answers)


def test_too_short_and_unknown_tasks_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match="longer length"):
        make_prompts("mq-niah", tokenizer, 300, 1)
    with pytest.raises(KeyspaceError, match="unknown task"):
        make_prompts("needle", tokenizer, 3000, 1)


def test_a_short_corpus_is_refused(tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Only a few words. Not enough.")
    with pytest.raises(KeyspaceError, match="fewer than"):
        make_prompts("niah", tokenizer, 2000, 1, haystack=str(small))


def test_snap_picks_the_nearest_allowed_position():
    assert snap(7, [0, 5, 10, 20]) == 5  # a tie goes to the earlier place
    assert snap(8, [0, 5, 10, 20]) == 10
    assert snap(25, [0, 5, 10, 20]) == 20


def test_exact_match_scores_whole_words_only():
    assert exact_match("The special magic number is 1234567.", ("1234567",)) == 1.0
    assert exact_match("It is 12345678.", ("1234567",)) == 0.0
    assert exact_match("the word is PIANO", ("piano",)) == 1.0
    assert exact_match("pianos", ("piano",)) == 0.0
    with pytest.raises(ValueError):
        exact_match("1 2", ("1", "2"))


def test_recall_scores_the_fraction_found():
    answers = ("1111111", "2222222", "3333333", "4444444")
    assert recall("1111111, 2222222, 3333333 and 4444444.", answers) == 1.0
    assert recall("1111111 and 3333333, then 9999999", answers) == 0.5
    assert recall("nothing here", answers) == 0.0
    assert recall("VAR ABCDE, VAR FGHIJ", ("ABCDE", "FGHIJ", "KLMNO")) == pytest.approx(2 / 3)


def test_wilson_interval_against_hand_computed_values():
    # 8 of 10: p = 0.8, z = 1.96; (p + z²/2n ∓ z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    scores = [0.0, 0.25, 0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    low, high = bootstrap_interval(scores)
    assert bootstrap_interval(scores) == (low, high)
    assert low < sum(scores) / len(scores) < high
    assert bootstrap_interval([0.5] * 6) == pytest.approx((0.5, 0.5))


def answer_stub(prompts_by_ids, tokenizer, right: bool, batches: list | None = None):
    """A decoder that answers every prompt of its batch right (its answers) or wrong, in
    new_tokens tokens each; `batches` records each call's batch size."""

    def answer(ids, new_tokens):
        answers = prompts_by_ids[tuple(ids.tolist())] if right else ("none",)
        tokens = tokenizer(" " + ", ".join(answers), add_special_tokens=False).input_ids
        assert len(tokens) <= new_tokens
        return torch.tensor(tokens + [tokenizer(" ").input_ids[0]] * (new_tokens - len(tokens)))

    def decode(model, ids, new_tokens):
        if batches is not None:
            batches.append(ids.shape[0])
        return torch.stack([answer(row, new_tokens) for row in ids])

    return decode


def test_run_tasks_plumbing_right_and_wrong(tokenizer):
    tasks, lengths, count = ["niah", "mv-niah"], [1800, 2200], 4
    prompts_by_ids = {
        tuple(p.ids[0].tolist()): p.answers
        for t in tasks
        for n in lengths
        for p in make_prompts(t, tokenizer, n, count, seed=5)
    }
    batches = []
    variants = {
        ("full", None, None): answer_stub(prompts_by_ids, tokenizer, right=True, batches=batches),
        ("loki", 16, 0.125): answer_stub(prompts_by_ids, tokenizer, right=False),
    }
    logged = []
    rows = run_tasks(
        tiny_llama(),
        tokenizer,
        variants,
        tasks,
        lengths,
        count,
        5,
        "filler",
        logged.append,
        batch=3,
    )
    assert batches == [3, 1] * 4  # 4 prompts per cell, 3 at a time
    assert len(rows) == len(logged) == 8
    assert {(r["method"], r["d"], r["k"], r["task"], r["length"]) for r in rows} == {
        (m, d, k, t, n) for (m, d, k) in variants for t in tasks for n in lengths
    }
    for row in rows:
        right = row["method"] == "full"
        assert row["accuracy"] == (1.0 if right else 0.0) and row["count"] == count
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    for row in rows:  # per-prompt scores, and the paired difference against full per cell
        assert len(row["scores"]) == count and sum(row["scores"]) / count == row["accuracy"]
        if row["method"] == "full":
            assert "vs_full" not in row
        else:
            assert row["vs_full"] == pytest.approx(-1.0)
            assert row["vs_full_low"] == row["vs_full_high"] == pytest.approx(-1.0)
    niah_right = next(r for r in rows if r["task"] == "niah" and r["method"] == "full")
    assert (niah_right["ci_low"], niah_right["ci_high"]) == pytest.approx(wilson_interval(4, 4))
    assert all("basis" not in r for r in rows)  # three-part keys: no basis field


def test_a_fourth_key_part_is_the_basis():
    from keyspace.tasks.run import result_row

    row = result_row(("loki", 32, 0.125, "query-aware"), TASKS["niah"], 1024, [1.0, 0.0])
    assert (row["method"], row["d"], row["k"], row["basis"]) == ("loki", 32, 0.125, "query-aware")
    assert row["accuracy"] == 0.5 and row["count"] == 2


def test_row_budgets_keep_dense_rows_whole():
    assert row_budgets(0.25, "row", 8, 8, dense_rows=5).tolist() == [1, 2, 3, 4, 5, 2, 2, 2]
    assert row_budgets(0.25, "window", 3, 8, dense_rows=6).tolist() == [6, 2, 2]
    assert row_budgets(0.25, "row", 8, 8, dense_rows=0).equal(row_budgets(0.25, "row", 8, 8))
    with pytest.raises(ValueError, match="dense_rows"):
        SparseSettings("exact-topk", k=0.5, dense_rows=-1)


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["exact-topk", "h2o", "streaming"])
def test_masked_decoder_at_k1_is_dense_greedy(prompt_ids, method):
    model = tiny_llama()
    dense = cache_decoder()(model, prompt_ids, 6)
    assert dense.shape == (1, 6)
    assert torch.equal(dense[0], greedy(model, DynamicCache(), prompt_ids, 6)[0])
    assert torch.equal(masked_decoder(SparseSettings(method, k=1.0))(model, prompt_ids, 6), dense)


@pytest.mark.parametrize("method", ["exact-topk", "streaming", "h2o"])
@pytest.mark.parametrize("k", [0.2, 0.5])
def test_one_row_steps_equal_whole_sequence_steps(prompt_ids, method, k):
    model, settings = tiny_llama(), SparseSettings(method, k=k)
    rows = masked_decoder(settings, whole_sequence=False)(model, prompt_ids, 6)
    whole = masked_decoder(settings, whole_sequence=True)(model, prompt_ids, 6)
    assert torch.equal(rows, whole)
    if k == 0.2:  # the budget bites: not the dense tokens, so the agreement means something
        assert not torch.equal(rows, cache_decoder()(model, prompt_ids, 6))


@pytest.mark.parametrize("method", ["exact-topk", "streaming", "h2o"])
def test_one_row_steps_at_a_token_budget_equal_whole_sequence_steps(batch_ids, method):
    """A token budget (min(budget, context) per step): h2o's heavy-hitter steps, like the other
    row decoders, give the slow reference's tokens; a budget above the context is dense."""
    model, settings = tiny_llama(), SparseSettings(method, budget=6)
    rows = masked_decoder(settings)(model, batch_ids, 6)
    assert torch.equal(rows, masked_decoder(settings, whole_sequence=True)(model, batch_ids, 6))
    dense = cache_decoder()(model, batch_ids, 6)
    assert not torch.equal(rows, dense)  # 6 of 40+ keys: the budget bites
    everything = masked_decoder(SparseSettings(method, budget=1000))(model, batch_ids, 6)
    assert torch.equal(everything, dense)


def test_heavy_hitters_keep_min_budget_and_context():
    from keyspace.tasks.heavy_hitters import HeavyHitters

    assert [HeavyHitters(budget=8).rule.kept(n) for n in (3, 8, 50)] == [3, 8, 8]
    assert [HeavyHitters(0.25).rule.kept(n) for n in (3, 8, 50)] == [1, 2, 13]
    with pytest.raises(ValueError, match="exactly one"):
        HeavyHitters(0.25, 8)


@pytest.fixture(scope="module")
def batch_ids():
    return torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["exact-topk", "streaming", "h2o"])
def test_batched_row_steps_equal_whole_sequence_steps(batch_ids, method):
    model, settings = tiny_llama(), SparseSettings(method, k=0.2)
    rows = masked_decoder(settings)(model, batch_ids, 6)
    assert rows.shape == (3, 6)
    assert torch.equal(rows, masked_decoder(settings, whole_sequence=True)(model, batch_ids, 6))


def loki_cache():
    return LokiCache(random_bases(2, 2, seed=5), [4, 4], k=0.25)


@pytest.mark.parametrize(
    "decoder",
    [
        cache_decoder(),
        cache_decoder(loki_cache),
        masked_decoder(SparseSettings("exact-topk", k=0.2)),
        masked_decoder(SparseSettings("h2o", k=0.2)),
        masked_decoder(SparseSettings("streaming", k=0.2)),
    ],
    ids=["dense", "loki", "exact-topk", "h2o", "streaming"],
)
def test_a_batch_decodes_as_its_prompts_one_at_a_time(batch_ids, decoder):
    model = tiny_llama()
    together = decoder(model, batch_ids, 6)
    alone = torch.cat([decoder(model, batch_ids[i : i + 1], 6) for i in range(3)])
    assert together.shape == alone.shape == (3, 6)
    assert torch.equal(together, alone)
    assert len({tuple(row) for row in together.tolist()}) > 1  # the rows are not one answer


def test_decoders_refuse_a_one_dimensional_prompt(prompt_ids):
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        cache_decoder()(tiny_llama(), prompt_ids[0], 2)


def test_masked_decoder_restores_the_model(prompt_ids):
    model = tiny_llama()
    before = model.config._attn_implementation
    masked_decoder(SparseSettings("h2o", k=0.25))(model, prompt_ids, 3)
    masked_decoder(SparseSettings("exact-topk", k=0.25))(model, prompt_ids, 3)
    assert model.config._attn_implementation == before


def test_haystack_loader_names_its_source(tokenizer):
    assert load_haystack("filler", tokenizer).repeat
    pydoc = load_haystack("pydoc", tokenizer)
    assert not pydoc.repeat and pydoc.source == "pydoc_data.topics" and len(pydoc.ids) > 100_000


@pytest.mark.slow
def test_niah_on_smollm2_with_full_attention():
    from keyspace.models.loading import load_model

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    rows = run_tasks(
        loaded.model, loaded.tokenizer, {("full", None, None): cache_decoder()}, ["niah"], [512], 2
    )
    assert rows[0]["accuracy"] == 1.0  # 10/10 at 1024 and 2048 (docs/notes/tasks-calibration.md)


def test_paired_difference_against_an_independent_bootstrap():
    import numpy as np

    from keyspace.tasks.scoring import paired_difference

    rng = np.random.default_rng(3)
    ours = rng.integers(0, 2, 40).astype(float).tolist()
    theirs = rng.integers(0, 2, 40).astype(float).tolist()
    diff, low, high = paired_difference(ours, theirs)
    assert diff == pytest.approx(np.mean(ours) - np.mean(theirs))
    # numpy's own paired bootstrap (other generator, many resamples) agrees to about 0.02
    d = np.array(ours) - np.array(theirs)
    means = d[np.random.default_rng(0).integers(0, 40, (20000, 40))].mean(axis=1)
    assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=0.03)
    assert low < diff < high


def test_paired_difference_sees_what_unpaired_intervals_miss():
    from keyspace.tasks.scoring import paired_difference

    # Full is right on 39 of 50 prompts; the sparse variant on 34 of those same 39, none else.
    full = [1.0] * 39 + [0.0] * 11
    sparse = [1.0] * 34 + [0.0] * 16
    diff, low, high = paired_difference(sparse, full)
    assert diff == pytest.approx(-0.10) and high < 0  # a loss that the paired interval resolves
    assert wilson_interval(34, 50)[1] > wilson_interval(39, 50)[0]  # the unpaired ones overlap
    assert paired_difference(full, full) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same"):
        paired_difference([1.0], [1.0, 0.0])


@pytest.mark.parametrize("budget", [2**29, 2 * 3 * 20 * 3])  # one chunk; chunks of 3 rows
def test_h2o_column_sums_match_the_whole_causal_softmax(monkeypatch, budget):
    from keyspace.tasks import heavy_hitters

    monkeypatch.setattr(heavy_hitters, "CHUNK_ELEMENTS", budget)
    gen = torch.Generator().manual_seed(4)
    query, key = torch.randn(2, 3, 20, 8, generator=gen), torch.randn(2, 3, 20, 8, generator=gen)
    logits = (query @ key.transpose(-1, -2)) * 0.3
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    expected = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(dim=-2)
    got = heavy_hitters.column_sums(query, key, 0.3)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.sum().item() == pytest.approx(2 * 3 * 20, rel=1e-5)  # every row's weights sum to 1
