"""Model shapes for speed runs, and the byte arithmetic of a decode step's floor.

Speed does not depend on the weights: the named configs are random-init at real shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from keyspace.models.arch import keep_layers
from keyspace.models.configs import CONFIG_NAMES, MODEL_CONFIGS, named_config  # noqa: F401
from keyspace.models.loading import load_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def model_config(name: str, layers: int | None = None):
    """The transformers config of a known shape (keyspace.models.configs), cut to `layers`
    decoder layers."""
    config = named_config(name)
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


# --- memory a sweep row needs, before anything is allocated ------------------------------------

MARGIN_BYTES = 2 << 30  # CUDA graphs' pool, compiled kernels' and cuBLAS workspaces, rounding


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one (batch, seq) of the end-to-end bench holds at its peak: the weights, one static
    cache (dense and Loki store the same 2·D elements per token and KV head), a prefill chunk's
    workspace, and a fixed margin."""

    weights: int
    kv_cache: int
    prefill: int
    margin: int = MARGIN_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.prefill + self.margin

    def describe(self) -> str:
        parts = (
            f"weights {self.weights / 1e9:.1f}",
            f"KV cache {self.kv_cache / 1e9:.1f}",
            f"prefill workspace {self.prefill / 1e9:.1f}",
            f"margin {self.margin / 1e9:.1f}",
        )
        return f"{self.total / 1e9:.1f} GB ({', '.join(parts)} GB)"


def parameter_bytes(config, element_size: int) -> int:
    """Bytes of a model's parameters at `config`'s shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * element_size


def cache_bytes(shape: Shape, batch: int, capacity: int) -> int:
    """Bytes of one static cache (`StaticKVCache` or `StaticLokiCache`) of `capacity` tokens."""
    per_token = 2 * shape.kv_heads * shape.head_dim * shape.element_size
    return shape.layers * batch * capacity * per_token


def prefill_bytes(config, shape: Shape, batch: int, seq: int, loop) -> int:
    """An upper estimate of a prefill chunk's transient bytes under the loop settings `loop`: the
    layer's activations (residual stream and norms, the fused q/k/v and their RoPE copies, gate/up,
    the gated product), Loki's float32 rotated query, and the attention's repeated K/V slice (see
    `keyspace.loki.prefill`), the slice's rotated keys and the (T, S) mask with its float bias."""
    from keyspace.loki.prefill import chunk_length, heads_per_slice

    es, dim = shape.element_size, shape.head_dim
    chunk = min(seq, chunk_length(batch, loop.prefill_chunk, loop.prefill_tokens))
    tokens, q_width = batch * chunk, shape.q_heads * dim
    qkv = q_width + 2 * shape.kv_heads * dim
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    activations = tokens * es * (6 * config.hidden_size + 2 * qkv + 4 * inter)
    groups = shape.q_heads // shape.kv_heads
    heads = heads_per_slice(batch, groups, seq, dim, es, shape.kv_heads, loop.prefill_workspace)
    repeated = 2 * batch * groups * heads * seq * dim * es if groups > 1 else 0
    attention = repeated + batch * heads * seq * dim * es + chunk * seq * (1 + es)
    return activations + tokens * q_width * (4 + es) + attention


def memory_need(config, element_size: int, batch: int, seq: int, capacity: int, loop) -> MemoryNeed:
    """What a (batch, seq) row of the bench needs, from the config alone."""
    shape = Shape.from_config(config, element_size)
    return MemoryNeed(
        weights=parameter_bytes(config, element_size),
        kv_cache=cache_bytes(shape, batch, capacity),
        prefill=prefill_bytes(config, shape, batch, seq, loop),
    )
