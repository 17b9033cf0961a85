"""Tiny random-init models of each supported architecture, plus a tiny offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
TEXT = (
    "The quick brown fox jumps over the lazy dog. Keys live in a low dimensional space. "
    "Attention reads every cached key, Loki reads only the best ones. "
) * 40


def tiny_config(arch: str = "llama", **overrides):
    import transformers

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=512,
    )
    table = {
        "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
        "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
        "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2)),
        "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
        "phi3": (transformers.Phi3Config, dict(num_key_value_heads=2, pad_token_id=0)),
        "gpt_neox": (transformers.GPTNeoXConfig, dict(rotary_pct=0.25)),
    }
    cls, extra = table[arch]
    return cls(**{**common, **extra, **overrides})


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on TEXT: offline, deterministic, vocab <= VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a loadable HF folder (weights, config, tokenizer) for `--model folder`."""
    model = tiny_model(arch, seed, **overrides)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_corpus(path: Path, repeats: int = 1) -> Path:
    path.write_text(TEXT * repeats)
    return path


def cut_after_one_chunk(monkeypatch, cfg):
    """Collect `cfg` until its second chunk's commit fails with a full disk: a partial run of one
    chunk. Returns the error collect raised (its hint says how to resume)."""
    import pytest

    import keyspace.collect.runner as mod
    from keyspace.errors import KeyspaceError

    real_commit, calls = mod.commit_chunk, {"n": 0}

    def failing_commit(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_commit(*args)

    monkeypatch.setattr(mod, "commit_chunk", failing_commit)
    with pytest.raises(KeyspaceError, match="no space left") as err:
        mod.collect(cfg)
    monkeypatch.setattr(mod, "commit_chunk", real_commit)
    return err.value
