"""The real SmolLM2-135M (GGUF from PyPI), collected on a few windows of real text."""

from pathlib import Path

import pytest
import torch

from keyspace.collect.runner import CollectConfig, collect
from keyspace.runfolder.store import RunFolder

WIKITEXT_VALID = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
)


@pytest.mark.slow
def test_collect_real_smollm2(tmp_path):
    dataset = str(WIKITEXT_VALID) if WIKITEXT_VALID.is_file() else "pydoc"
    cfg = CollectConfig(
        model="smollm2-135m",
        dataset=dataset,
        out=tmp_path / "run",
        window=256,
        max_tokens=512,
        keep_keys="all",
    )
    result = collect(cfg)
    run = RunFolder.open(result.out).require_complete()
    m = run.manifest.to_json()
    assert (m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"]) == (30, 9, 3, 64)
    assert m["rotary"]["theta"] == 100000.0 and m["model"]["identity"].startswith("gguf:")
    assert int(run.moments("post").count[29]) == 512

    # Post-RoPE keys must be HF's RoPE of the pre-RoPE keys at the recorded positions.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from keyspace.models.loading import load_model

    rope = LlamaRotaryEmbedding(load_model("smollm2-135m").model.config)
    for layer in (0, 29):
        pre, positions, _ = run.kept_keys("pre", layer)
        post, positions_post, _ = run.kept_keys("post", layer)
        assert torch.equal(positions, positions_post)
        k = pre.unsqueeze(0).transpose(1, 2)  # (1, Hkv, N, D)
        cos, sin = rope(k, positions.unsqueeze(0))
        _, rotated = apply_rotary_pos_emb(k, k, cos, sin)
        torch.testing.assert_close(rotated.transpose(1, 2)[0], post, rtol=1e-5, atol=1e-4)
