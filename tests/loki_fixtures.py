"""Shared helpers for the Loki and validate tests: tiny random-init models and random bases."""

from __future__ import annotations

import torch

HEAD_DIM = 16


def tiny_llama(seed: int = 0, layers: int = 2, attn: str = "sdpa"):
    """A random-init Llama: hidden 64, 4 query heads, 2 KV heads, head_dim 16, float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_bases(
    layers: int, kv_heads: int, head_dim: int = HEAD_DIM, seed: int = 0
) -> torch.Tensor:
    """(layers, kv_heads, D, D) random orthonormal matrices, rows as directions."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(layers, kv_heads, head_dim, head_dim, generator=gen)
    q, _ = torch.linalg.qr(raw)
    return q.transpose(-1, -2).contiguous()


def logits_of(model, tokens, settings=None):
    """The model's logits over `tokens`, dense or (with settings) under Loki's masked mode."""
    from keyspace.loki import masked_attention

    with torch.no_grad():
        if settings is None:
            return model(tokens, use_cache=False).logits
        with masked_attention(model, settings):
            return model(tokens, use_cache=False).logits


def random_tokens(
    batch: int = 2, length: int = 24, vocab: int = 128, seed: int = 0
) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


WORDS = (
    [f"w{i}" for i in range(100)]
    + [str(i) for i in range(10)]
    + ["the", "key", "is", "what", "?", "."]
)


def tiny_tokenizer():
    """A word-level tokenizer over WORDS plus <unk>, <s>, </s>; no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_text_corpus(path, words: int = 3000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, 100, (words,), generator=gen).tolist()
    path.write_text(" ".join(f"w{i}" for i in picks) + "\n")
    return path


def synthetic_model_run(
    root, identity: str | None = None, with_ranks: bool = True, with_calibration: bool = True
):
    """A complete run folder for a tiny random Llama saved under root/model; returns the run path.

    The calibration holds random orthonormal bases; ranks.json has rank_at 0.9 for pre and post.
    """
    from keyspace.analyze.pca import write_ranks
    from keyspace.models.loading import load_model
    from keyspace.runfolder.calibration import Calibration
    from keyspace.runfolder.store import write_manifest

    model_dir, run = root / "model", root / "run"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    identity = identity or load_model(str(model_dir)).identity
    run.mkdir(parents=True)
    layers, kv_heads = 2, 2
    manifest = {
        "keyspace_version": "0.1.0",
        "model": {"spec": str(model_dir), "identity": identity},
        "dataset": {"spec": "synthetic", "split": "validation"},
        "dtype": "float32",
        "window": 64,
        "tokens": 512,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "num_heads": 4,
        "head_dim": HEAD_DIM,
        "shards": [],
        "state": "complete",
    }
    write_manifest(run, manifest)
    ranks = {"thresholds": [0.9], "head_dim": HEAD_DIM}
    if with_calibration:
        eigen = torch.linspace(2.0, 0.1, HEAD_DIM).expand(layers, kv_heads, HEAD_DIM).contiguous()
        kinds = ("pre", "post")
        ranks["calibration_sha256"] = Calibration(
            mean={k: torch.zeros(layers, kv_heads, HEAD_DIM) for k in kinds},
            components={k: random_bases(layers, kv_heads, seed=i) for i, k in enumerate(kinds)},
            eigenvalues={k: eigen.clone() for k in kinds},
            metadata={"model_identity": identity},
        ).save(run / "calibration.safetensors")
    if with_ranks:
        for offset, kind in enumerate(("pre", "post")):
            ranks[kind] = {"rank_at": {"0.9": [[3 + offset, 6], [9, 12 + offset]]}}
        write_ranks(run, ranks)  # sealed as analyze seals it, recording the calibration's hash
    write_text_corpus(root / "corpus.txt")
    return run
