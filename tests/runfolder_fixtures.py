"""Run folders written directly from synthetic keys, without a model (for analyze/transfer/report tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from keyspace.runfolder.store import KINDS, Moments, save_moments, sha256_file, write_manifest


def moments_of(x: torch.Tensor) -> Moments:
    """x (layers, samples, heads, dim) -> its Moments, one layer at a time."""
    layers, _, heads, dim = x.shape
    m = Moments.zeros(layers, heads, dim)
    for layer in range(layers):
        m.add_keys(layer, x[layer])
    return m


def low_rank_keys(
    tokens: int,
    layers: int,
    heads: int,
    head_dim: int,
    ranks: list[list[int]],
    noise: float = 1e-3,
    seed: int = 0,
) -> torch.Tensor:
    """Keys (layers, tokens, heads, head_dim) float64; head (l, h) lies in a random ranks[l][h]-dim
    subspace with decaying scales, plus isotropic noise of std `noise`, plus a nonzero mean."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.empty(layers, tokens, heads, head_dim, dtype=torch.float64)
    for layer in range(layers):
        for head in range(heads):
            r = ranks[layer][head]
            basis, _ = torch.linalg.qr(torch.randn(head_dim, r, generator=gen, dtype=torch.float64))
            # Flat enough scales that rank@0.9 is exactly r.
            scales = torch.linspace(1.0, 0.7, r, dtype=torch.float64)
            coeffs = torch.randn(tokens, r, generator=gen, dtype=torch.float64) * scales
            offset = torch.randn(head_dim, generator=gen, dtype=torch.float64)
            noise_part = noise * torch.randn(tokens, head_dim, generator=gen, dtype=torch.float64)
            keys[layer, :, head] = coeffs @ basis.T + offset + noise_part
    return keys


def write_run(
    path: str | Path,
    keys: dict[str, torch.Tensor],
    model_identity: str = "test/tiny-llama@0000",
    dataset: str = "synthetic",
    window: int = 128,
    keep_keys: bool = True,
    state: str = "complete",
) -> Path:
    """A run folder from keys[kind]: (layers, tokens, heads, head_dim). Windows are consecutive
    blocks of `window` tokens. Kept shards (two per layer, float32) only when keep_keys."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers, tokens, heads, head_dim = keys["pre"].shape
    moments = {}
    shards = []
    positions = torch.arange(tokens, dtype=torch.int64) % window
    windows = torch.arange(tokens, dtype=torch.int64) // window
    for kind in KINDS:
        m = Moments.zeros(layers, heads, head_dim)
        for layer in range(layers):
            m.add_keys(layer, keys[kind][layer])
            if keep_keys:
                shards += write_shards(path, kind, layer, keys[kind][layer], positions, windows)
        moments[kind] = m
    doc = manifest(
        model_identity, dataset, window, tokens, keys["pre"].shape, shards, state, keep_keys
    )
    doc["moments"] = {
        "path": "moments.safetensors",
        "sha256": save_moments(path / "moments.safetensors", moments),
    }
    write_manifest(path, doc)
    return path


def write_shards(
    path: Path,
    kind: str,
    layer: int,
    keys: torch.Tensor,
    positions: torch.Tensor,
    windows: torch.Tensor,
) -> list[dict]:
    """Two shards splitting this layer's tokens; returns their manifest entries."""
    entries = []
    half = keys.shape[0] // 2
    for index, part in enumerate((slice(0, half), slice(half, None))):
        rel = f"keys/{kind}/layer{layer:02d}/shard{index:05d}.safetensors"
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "keys": keys[part].float().contiguous(),
            "positions": positions[part].contiguous(),
            "windows": windows[part].contiguous(),
        }
        save_file(tensors, str(path / rel))
        entries.append(
            {
                "kind": kind,
                "layer": layer,
                "index": index,
                "path": rel,
                "tokens": int(keys[part].shape[0]),
                "sha256": sha256_file(path / rel),
            }
        )
    return entries


def manifest(model_identity, dataset, window, tokens, shape, shards, state, keep_keys) -> dict:
    layers, _, heads, head_dim = shape
    return {
        "keyspace_version": "0.1.0",
        "model": {
            "spec": "tiny",
            "identity": model_identity,
            "source": "synthetic",
            "architecture": "LlamaForCausalLM",
        },
        "dataset": {"spec": dataset, "split": "test"},
        "dtype": "float32",
        "window": window,
        "tokens": tokens,
        "num_layers": layers,
        "num_kv_heads": heads,
        "num_heads": heads * 2,
        "head_dim": head_dim,
        "rotary": {"theta": 10000.0, "partial": 1.0},
        "shards": shards,
        "state": state,
        "keep_keys": "all" if keep_keys else "none",
    }


def synthetic_run(
    path: str | Path,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 16,
    tokens: int = 512,
    seed: int = 0,
    **kwargs,
) -> Path:
    """A small run whose pre keys have ranks 2, 3, ... and post keys ranks a little higher."""
    pre_ranks = [[2 + (layer + head) % 4 for head in range(heads)] for layer in range(layers)]
    post_ranks = [[min(head_dim, r + 2) for r in row] for row in pre_ranks]
    keys = {
        "pre": low_rank_keys(tokens, layers, heads, head_dim, pre_ranks, seed=seed),
        "post": low_rank_keys(tokens, layers, heads, head_dim, post_ranks, seed=seed + 1),
    }
    return write_run(path, keys, **kwargs)
