"""Every architecture fact keyspace needs, in one table: where the keys and queries live, how many
heads of which size, and which modules are attention layers.

A new architecture is one `ArchSpec` row here plus its tiny config in tests/tiny_models.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from keyspace.errors import KeyspaceError


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture's pre-RoPE keys and queries live inside its attention module.

    layout: "kv" (B,T,H*D), "heads" (B,T,H,D), "phi3_qkv" (fused [q | k | v]), "neox_qkv"
    (per head [q | k | v]); the same layout names serve keys (H = kv_heads) and queries.
    """

    pre_module: str  # attribute of the attention module whose output holds the keys
    layout: str
    query_module: str  # attribute whose output holds the queries
    query_layout: str


ARCHITECTURES = {
    "llama": ArchSpec("k_proj", "kv", "q_proj", "kv"),
    "mistral": ArchSpec("k_proj", "kv", "q_proj", "kv"),
    "qwen2": ArchSpec("k_proj", "kv", "q_proj", "kv"),
    "qwen3": ArchSpec("k_norm", "heads", "q_norm", "heads"),
    "phi3": ArchSpec("qkv_proj", "phi3_qkv", "qkv_proj", "phi3_qkv"),
    "gpt_neox": ArchSpec("query_key_value", "neox_qkv", "query_key_value", "neox_qkv"),
}


def arch_spec(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", type(config).__name__)
    if model_type not in ARCHITECTURES:
        raise KeyspaceError(
            f"architecture {model_type} is not supported.",
            f"Supported: {', '.join(sorted(ARCHITECTURES))}.",
        )
    return ARCHITECTURES[model_type]


def head_geometry(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def attention_modules(model: Any, spec: ArchSpec) -> list[Any]:
    """Attention modules in layer order (those with a `layer_idx` and the pre-RoPE submodule)."""
    found = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and isinstance(
            getattr(module, spec.pre_module, None), torch.nn.Module
        ):
            found[module.layer_idx] = module
    return [found[i] for i in sorted(found)]
