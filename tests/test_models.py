"""Model specs: aliases, folders, .gguf paths and hub ids resolve or fail clearly."""

import pytest
from tiny_models import save_tiny_model

from keyspace.errors import KeyspaceError
from keyspace.models.loading import load_model, resolve_spec


def test_resolve_spec_kinds(tmp_path):
    assert resolve_spec("smollm2-135m") == ("alias", "smollm2-135m")
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_spec(str(tmp_path / "m.gguf"))[0] == "gguf"
    with pytest.raises(KeyspaceError, match="unknown model"):
        resolve_spec("smollm9")
    with pytest.raises(KeyspaceError, match="does not exist"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(KeyspaceError, match="unknown model"):
        resolve_spec(str(tmp_path / "missing-folder"))
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(KeyspaceError, match="config.json"):
        resolve_spec(str(tmp_path / "noconfig"))


def test_local_folder_identity_follows_the_weights(tmp_path):
    a = load_model(str(save_tiny_model(tmp_path / "a", seed=0)))
    b = load_model(str(save_tiny_model(tmp_path / "b", seed=0)))
    c = load_model(str(save_tiny_model(tmp_path / "c", seed=1)))
    assert a.identity == b.identity != c.identity
    assert a.info["source"] == "folder" and a.info["files"]


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYSPACE_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(KeyspaceError, match="could not load GGUF"):
        load_model(str(bad))
