"""The end-to-end bench's memory: the check before anything is allocated, freeing between rows,
and the peak a row reached. `cfg` is an `keyspace.bench.e2e.E2EConfig`."""

from __future__ import annotations

import dataclasses
import gc

import torch

from keyspace.bench.shapes import DTYPES, memory_need, model_config
from keyspace.errors import KeyspaceError
from keyspace.loki.graphs import bucket_end


def capacity_of(seq: int, cfg) -> int:
    """Cache tokens a row allocates: prompt and steps, up to a bucket end (masks stay aligned)."""
    return bucket_end(seq + cfg.steps + 1, cfg.loop.bucket, 1 << 62)


def check_memory(cfg, free_bytes: int, config=None, weights_loaded: bool = False):
    """Raise a KeyspaceError naming the memory needed by the first (batch, seq) of the sweep that
    cannot fit `free_bytes`; `config` defaults to cfg.config's, and with `weights_loaded` the
    weights are already resident (not counted)."""
    config = config or model_config(cfg.config, cfg.layers)
    element = torch.empty(0, dtype=DTYPES[cfg.dtype]).element_size()
    for batch in sorted(cfg.batches, reverse=True):
        for seq in sorted(cfg.seqs, reverse=True):
            need = memory_need(config, element, batch, seq, capacity_of(seq, cfg), cfg.loop)
            if weights_loaded:
                need = dataclasses.replace(need, weights=0)
            if need.total > free_bytes:
                raise KeyspaceError(
                    f"B={batch} S={seq} needs {need.describe()}; the card has "
                    f"{free_bytes / 1e9:.1f} GB free.",
                    "Lower --batch or --seq (the KV cache grows with both).",
                )


def free_memory() -> None:
    """Return the freed caches' blocks to the device: the next row allocates on a clean slate."""
    gc.collect()
    torch.cuda.empty_cache()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9
