"""One chunk of a collect run: the buffer the capture callbacks fill, and the key shards written
from it.

Keys update the moments of their kind and, for the sampled tokens, are kept for the shards.
Queries only update moments: per KV head, its group's G query heads pooled (`pool_groups`), in
the moments kinds `query.pre` / `query.post` (`keyspace.runfolder.store.query_kind`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from keyspace.collect.capture import pool_groups
from keyspace.errors import KeyspaceError
from keyspace.runfolder.store import KINDS, Moments, query_kind, save_tensors, shard_name

SAMPLE_SEED = 0


def moment_kinds(capture: tuple[str, ...]) -> tuple[str, ...]:
    """The moments kinds a run with this --capture records."""
    queries = tuple(query_kind(k) for k in KINDS) if "queries" in capture else ()
    return KINDS + queries


def zero_moments(capture: tuple[str, ...], shape: tuple[int, int, int]) -> dict[str, Moments]:
    """Empty moments of every kind `capture` records; shape: (layers, kv_heads, head_dim)."""
    return {kind: Moments.zeros(*shape) for kind in moment_kinds(capture)}


def require_kinds(moments: dict[str, Moments], capture: tuple[str, ...], where: str) -> None:
    """Refuse committed moments that lack a kind this run records (they would undercount it)."""
    missing = [k for k in moment_kinds(capture) if k not in moments]
    if missing:
        raise KeyspaceError(
            f"{where} holds no {', '.join(missing)} moments, but the run captures {','.join(capture)}.",
            "Collect into a new --out, or resume with the --capture the run was started with.",
        )


class WindowLayout:
    """The run's windows in global order (all of the first --window length, then the next ...):
    where each window's tokens start in the run, and batches that never mix lengths."""

    def __init__(self, groups: list[torch.Tensor]):
        self.groups = groups  # one (n_windows, length) token-id tensor per length
        self.lengths = torch.cat(
            [torch.full((g.shape[0],), g.shape[1], dtype=torch.long) for g in groups]
        )
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        counts = torch.tensor([g.shape[0] for g in groups], dtype=torch.long)
        self.group_starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def tokens_of(self, window_ids: list[int]) -> int:
        return int(self.lengths[window_ids].sum()) if window_ids else 0

    def batches(
        self, window_ids: list[int], batch_size: int
    ) -> list[tuple[list[int], torch.Tensor]]:
        """(window ids, (B, length) token ids): consecutive ids of one length, ≤ batch_size each."""
        found = []
        for g, tokens in enumerate(self.groups):
            low, high = int(self.group_starts[g]), int(self.group_starts[g + 1])
            mine = [w for w in window_ids if low <= w < high]
            for start in range(0, len(mine), batch_size):
                ids = mine[start : start + batch_size]
                found.append((ids, tokens[torch.tensor(ids) - low]))
        return found


def keep_mask(keep_keys: str, total_tokens: int) -> torch.Tensor:
    """Which global token indices (the window's first token's index + position) keep their keys."""
    if keep_keys == "all":
        return torch.ones(total_tokens, dtype=torch.bool)
    mask = torch.zeros(total_tokens, dtype=torch.bool)
    if keep_keys != "none":
        generator = torch.Generator().manual_seed(SAMPLE_SEED)
        mask[torch.randperm(total_tokens, generator=generator)[: int(keep_keys)]] = True
    return mask


class ChunkBuffer:
    """Accumulates one chunk's moments updates and kept keys from the capture callbacks."""

    def __init__(self, moments: dict[str, Moments], keep: torch.Tensor, offsets: torch.Tensor):
        # offsets[w]: the global index of window w's first token (WindowLayout.offsets)
        self.moments, self.keep, self.offsets = moments, keep, offsets
        self.kept: dict[tuple[str, int], list[tuple[torch.Tensor, ...]]] = {}
        self.window_ids: torch.Tensor = torch.empty(0, dtype=torch.long)

    def on_keys(self, kind: str, layer: int, keys: torch.Tensor) -> None:
        # keys: (B, T, Hkv, D) for the windows in self.window_ids
        keys = keys.detach().cpu()
        for b, w in enumerate(self.window_ids.tolist()):
            self.moments[kind].add_keys(layer, keys[b])
            mask = self.keep[int(self.offsets[w]) : int(self.offsets[w + 1])]
            if mask.any():
                positions = mask.nonzero().squeeze(1)
                entry = (keys[b][positions].clone(), positions, torch.full_like(positions, w))
                self.kept.setdefault((kind, layer), []).append(entry)

    def on_queries(self, kind: str, layer: int, queries: torch.Tensor) -> None:
        # queries: (B, T, H, D); each KV head pools its group's G query heads
        moments = self.moments[query_kind(kind)]
        kv_heads = moments.shape[1]
        for b in range(len(self.window_ids)):
            moments.add_keys(layer, pool_groups(queries[b].detach().cpu(), kv_heads))


def write_shards(out: Path, buffer: ChunkBuffer, rank: int, chunk: int) -> list[dict]:
    """Write the chunk's kept keys, one shard per (kind, layer); returns their manifest entries."""
    shards = []
    for (kind, layer), entries in sorted(buffer.kept.items()):
        keys, positions, windows = (torch.cat(parts) for parts in zip(*entries, strict=True))
        rel = shard_name(kind, layer, rank, chunk)
        digest = save_tensors(out / rel, {"keys": keys, "positions": positions, "windows": windows})
        shards.append(
            {
                "kind": kind,
                "layer": layer,
                "index": chunk,
                "rank": rank,
                "path": rel,
                "tokens": int(keys.shape[0]),
                "sha256": digest,
            }
        )
    return shards
