"""Model shapes for speed runs, and the byte arithmetic of a decode step's floor.

Speed does not depend on the weights: the named configs are random-init at real shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from keyspace.models.arch import keep_layers
from keyspace.models.loading import alias_config, load_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Real shapes, random weights. smollm2-135m comes from keyspace.models.loading.alias_config.
_LLAMA = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
MODEL_CONFIGS = {
    "llama3-8b": {
        **_LLAMA,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "llama2-7b": {
        **_LLAMA,
        "intermediate_size": 11008,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "rope_theta": 10000.0,
    },
}
CONFIG_NAMES = (*MODEL_CONFIGS, "smollm2-135m")


def model_config(name: str, layers: int | None = None):
    """The transformers config of a known shape, cut to `layers` decoder layers."""
    if name == "smollm2-135m":
        config = alias_config(name)
    else:
        settings = dict(MODEL_CONFIGS[name])
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    if layers is not None:
        config.num_hidden_layers = min(layers, config.num_hidden_layers)
    config.max_position_embeddings = max(config.max_position_embeddings, 131072)
    return config


def build_model(cfg, device: str = "cuda"):
    """A random-init model at `cfg.config`'s shape (made on the device), or the real `cfg.model`."""
    dtype = DTYPES[cfg.dtype]
    if cfg.model is not None:
        model = load_model(cfg.model, dtype=cfg.dtype, device=device).model
        if cfg.layers is not None:
            keep_layers(model, cfg.layers)
        return model.eval()
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(cfg.config, cfg.layers), dtype=dtype)
    return model.eval()


@dataclass(frozen=True)
class Shape:
    """What the byte floor needs to know of a model."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    element_size: int

    @classmethod
    def of(cls, model) -> Shape:
        return cls.from_config(model.config, next(model.parameters()).element_size())

    @classmethod
    def from_config(cls, config, element_size: int) -> Shape:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            q_heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            element_size=element_size,
        )


def weight_bytes(model, batch: int) -> int:
    """Bytes of weights a decode step reads: every parameter once, except the input embedding table,
    of which only the batch's rows are read (unless the head shares it and reads it whole)."""
    table = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == table.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared counted once
    rows = batch * table.shape[1] * table.element_size()
    return total - (0 if tied else table.numel() * table.element_size()) + rows


def kv_bytes(
    shape: Shape,
    batch: int,
    seq: int,
    d: int | None = None,
    k_top: int | None = None,
    group_select: bool = True,
) -> int:
    """Bytes of cache a decode step reads at `seq` tokens: dense K and V, or Loki's k_low over all
    rows plus the rest of the key and the value of the k_top selected rows of each index set."""
    es, dim = shape.element_size, shape.head_dim
    if d is None:
        return shape.layers * 2 * batch * shape.kv_heads * seq * dim * es
    sets = shape.kv_heads if group_select else shape.q_heads
    per_layer = shape.kv_heads * seq * d + sets * k_top * (2 * dim - d)
    return shape.layers * batch * per_layer * es


def floor_ms(nbytes: int, gbps: float) -> float:
    return nbytes / gbps / 1e6
