"""Corpora to token windows: every source, the windowing rule, and bad input."""

import json
from pathlib import Path

import pytest
from tiny_models import TEXT, tiny_tokenizer

from keyspace.collect.corpora import load_corpus, tokenize_windows
from keyspace.errors import KeyspaceError


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_pydoc_is_offline_and_large():
    corpus = load_corpus("pydoc")
    assert corpus.source == "pydoc_data.topics" and len(corpus.text) > 100_000


def test_windows_are_consecutive_non_overlapping_slices(tokenizer, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    tw = tokenize_windows(str(path), tokenizer, window=16, max_tokens=None)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert tw.windows.shape == (len(ids) // 16, 16)
    assert tw.windows.flatten().tolist() == ids[: tw.windows.numel()]
    assert not tw.bos and tw.corpus_tokens == len(ids)
    capped = tokenize_windows(str(path), tokenizer, window=16, max_tokens=40)
    assert capped.windows.shape == (2, 16)


def test_bos_is_prepended_when_the_tokenizer_adds_one(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    tokenizer.add_special_tokens({"bos_token": "<eos>"})
    monkeypatch.setattr("keyspace.collect.corpora._adds_bos", lambda tok: True)
    tw = tokenize_windows(str(path), tokenizer, window=16, max_tokens=64)
    assert tw.bos and (tw.windows[:, 0] == tokenizer.bos_token_id).all()
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert tw.windows[:, 1:].flatten().tolist() == ids[: 4 * 15]


def test_folder_of_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["delta"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    corpus = load_corpus(str(tmp_path))
    assert corpus.documents == ["alpha text", "beta", "gamma", "delta"]


def test_bad_corpora(tokenizer, tmp_path):
    with pytest.raises(KeyspaceError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(KeyspaceError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(KeyspaceError, match="text"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(KeyspaceError, match="no .txt"):
        load_corpus(str(empty_dir))
    (tmp_path / "short.txt").write_text("three words here")
    with pytest.raises(KeyspaceError, match="fewer than one window"):
        tokenize_windows(str(tmp_path / "short.txt"), tokenizer, window=64, max_tokens=None)
    with pytest.raises(KeyspaceError, match="window"):
        tokenize_windows("pydoc", tokenizer, window=1, max_tokens=None)


def test_wikitext_falls_back_to_local_copy_or_fails_clearly(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("keyspace.collect.corpora._local_wikitext_dirs", lambda: [tmp_path / "wt"])
    with pytest.raises(KeyspaceError, match="could not load wikitext") as err:
        load_corpus("wikitext", "validation")
    assert "--dataset" in err.value.hint
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "test.txt").write_text(" = Heading = \n text")
    corpus = load_corpus("wikitext", "test")
    assert corpus.source.endswith("test.txt") and "Heading" in corpus.text


def test_the_shared_wikitext_beside_the_checkout_is_found_from_any_folder(tmp_path, monkeypatch):
    """`--dataset wikitext` in an empty folder finds ../shared/data/wikitext-2 beside the checkout."""
    from keyspace.collect import corpora

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(corpora.WIKITEXT_LOCAL_ENV, raising=False)
    checkout = Path(corpora.__file__).resolve().parents[2]
    assert (checkout / "pyproject.toml").is_file()
    expected = checkout.parent / "shared" / "data" / "wikitext-2"
    assert expected in corpora._local_wikitext_dirs()
