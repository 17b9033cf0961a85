"""Every architecture fact keyspace needs, in one table: where the keys and queries live, how many
heads of which size, where the decoder layers, their attention and the final norm sit, and which
modules a compiled decode step swaps in. Capture, the decode loop and the bench shapes read it.

A new architecture is one `ArchSpec` row here plus its tiny config in tests/tiny_models.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from keyspace.errors import KeyspaceError


@dataclass(frozen=True)
class ArchSpec:
    """One architecture's facts.

    pre_module / query_module: attributes of the attention module whose outputs hold the pre-RoPE
    keys / queries, in `layout` / `query_layout`: "kv" (B,T,H*D), "heads" (B,T,H,D), "phi3_qkv"
    (fused [q | k | v]), "neox_qkv" (per head [q | k | v]); the same layout names serve keys
    (H = kv_heads) and queries.
    layers: dotted path from the causal-LM model to its decoder layers (a ModuleList)
    attention: attribute of a decoder layer holding its attention module
    final_norm: dotted path from the model to the norm after the last layer
    qkv: the attention's input projections, in output order: q, k, v (three GEMMs, which the decode
        loop fuses into one) or the one fused projection (Phi3, GPT-NeoX: nothing to fuse)
    output: the attention's output projection
    mlp: attribute of a decoder layer holding its MLP
    gate_up: the MLP's input projections, gate then up (fused by the decode loop), or its one
        input projection (Phi3's fused gate_up_proj; GPT-NeoX's ungated dense_h_to_4h)
    down: the MLP's output projection
    RoPE is applied inside the attention module: post-RoPE keys are what the attention function
    receives (partial rotary, GPT-NeoX, included), so the table needs no rotary facts.
    A compiled decode step swaps in each decoder layer and the final norm (`compiled_slots`).
    """

    pre_module: str
    layout: str
    query_module: str
    query_layout: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    final_norm: str = "model.norm"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    output: str = "o_proj"
    mlp: str = "mlp"
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    down: str = "down_proj"


_NEOX = {
    "layers": "gpt_neox.layers",
    "attention": "attention",
    "qkv": ("query_key_value",),
    "output": "dense",
    "gate_up": ("dense_h_to_4h",),
    "down": "dense_4h_to_h",
}
ARCHITECTURES = {
    "llama": ArchSpec("k_proj", "kv", "q_proj", "kv"),
    "mistral": ArchSpec("k_proj", "kv", "q_proj", "kv"),
    "qwen2": ArchSpec("k_proj", "kv", "q_proj", "kv"),
    "qwen3": ArchSpec("k_norm", "heads", "q_norm", "heads"),
    "phi3": ArchSpec(
        "qkv_proj", "phi3_qkv", "qkv_proj", "phi3_qkv", qkv=("qkv_proj",), gate_up=("gate_up_proj",)
    ),
    "gpt_neox": ArchSpec(
        "query_key_value",
        "neox_qkv",
        "query_key_value",
        "neox_qkv",
        **_NEOX,
        final_norm="gpt_neox.final_layer_norm",
    ),
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


def _parent_and_name(model: Any, path: str) -> tuple[Any, str]:
    """The module holding the attribute at dotted `path`, and that attribute's name."""
    *parents, name = path.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part, None)
    if owner is None or not isinstance(getattr(owner, name, None), torch.nn.Module):
        raise KeyspaceError(
            f"{type(model).__name__} has no module at {path}, where its architecture row says.",
            "Fix the row of this model type in keyspace/models/arch.py (ARCHITECTURES).",
        )
    return owner, name


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's decoder layers, in order."""
    parent, name = _parent_and_name(model, arch_spec(model.config).layers)
    return getattr(parent, name)


def keep_layers(model: Any, count: int) -> None:
    """Cut the model to its first `count` decoder layers (config included)."""
    parent, name = _parent_and_name(model, arch_spec(model.config).layers)
    setattr(parent, name, getattr(parent, name)[:count])
    model.config.num_hidden_layers = len(getattr(parent, name))


def compiled_slots(model: Any) -> list[tuple[Any, str, torch.nn.Module]]:
    """(parent, attribute, module) of what a compiled decode step swaps in: each decoder layer,
    then the final norm."""
    layers = decoder_layers(model)
    slots = [(layers, str(i), layer) for i, layer in enumerate(layers)]
    parent, name = _parent_and_name(model, arch_spec(model.config).final_norm)
    return slots + [(parent, name, getattr(parent, name))]


def attention_modules(model: Any, spec: ArchSpec) -> list[Any]:
    """Attention modules in layer order (each decoder layer's `spec.attention`)."""
    modules = [getattr(layer, spec.attention, None) for layer in decoder_layers(model)]
    if any(not isinstance(getattr(m, spec.pre_module, None), torch.nn.Module) for m in modules):
        raise KeyspaceError(
            f"{type(model).__name__}'s attention modules have no {spec.pre_module}.",
            "Fix the row of this model type in keyspace/models/arch.py (ARCHITECTURES).",
        )
    return modules
