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


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_table_finds_each_architectures_layers_and_attention(arch):
    """The row's paths against a scan of the model: attention modules are the modules with a
    layer_idx and the row's key projection, in layer order, one per decoder layer."""
    import torch
    from tiny_models import tiny_model

    from keyspace.models.arch import arch_spec, attention_modules, decoder_layers

    model = tiny_model(arch)
    spec = arch_spec(model.config)
    scanned = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx")
        and isinstance(getattr(m, spec.pre_module, None), torch.nn.Module)
    ]
    assert attention_modules(model, spec) == sorted(scanned, key=lambda m: m.layer_idx)
    assert len(decoder_layers(model)) == model.config.num_hidden_layers == len(scanned)


def test_a_row_that_does_not_fit_the_model_is_a_clear_error():
    from tiny_models import tiny_model

    from keyspace.models.arch import compiled_slots, keep_layers

    model = tiny_model("llama", num_hidden_layers=3)
    keep_layers(model, 2)
    assert len(model.model.layers) == model.config.num_hidden_layers == 2
    del model.model.norm
    with pytest.raises(KeyspaceError, match="no module at model.norm") as err:
        compiled_slots(model)
    assert "keyspace/models/arch.py" in err.value.hint
    model.config.model_type = "bert"
    with pytest.raises(KeyspaceError, match="bert is not supported"):
        compiled_slots(model)


# ---- the model cache: reading a warm one takes no lock; an unwritable one is one clear error ---


def test_a_warm_alias_cache_loads_without_the_lock(tmp_path, monkeypatch):
    """A read-only shared cache (clusters): nothing to fetch or convert, so no lock file."""
    import hashlib

    from keyspace.models import loading

    home = tmp_path / "home"
    gguf = home / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF stand-in")
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    converted = save_tiny_model(home / "converted" / digest[:16])
    (converted / loading.CONVERTED_MARKER).write_text("{}")
    monkeypatch.setenv("KEYSPACE_HOME", str(home))

    def no_lock():
        raise AssertionError("a warm cache took the lock")

    monkeypatch.setattr(loading, "_home_lock", no_lock)
    loaded = load_model("smollm2-135m")
    assert loaded.identity == f"gguf:{digest}"
    assert not (home / ".lock-models").exists()


def test_a_cold_cache_that_cannot_be_locked_is_one_error_naming_the_lock(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where KEYSPACE_HOME's folder should be")
    monkeypatch.setenv("KEYSPACE_HOME", str(tmp_path / "file" / "home"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF stand-in")
    with pytest.raises(KeyspaceError, match=r"cannot lock .*\.lock-models") as caught:
        load_model(str(tmp_path / "m.gguf"))
    assert "KEYSPACE_HOME" in caught.value.hint


def test_hub_retries_are_quiet_while_loading_and_logging_comes_back():
    import logging

    from keyspace.models.loading import _quiet_hub_retries

    retries = logging.getLogger("huggingface_hub.utils._http")
    with _quiet_hub_retries():
        assert not retries.isEnabledFor(logging.WARNING)
    assert retries.isEnabledFor(logging.WARNING)
