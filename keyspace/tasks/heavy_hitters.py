"""H2O as a decode path: dense prefill, then each step keeps heavy hitters plus recent tokens.

A key's heavy-hitter score is the dense attention it has received from every row so far, prompt
rows included (the running sum of H2O). The prefill adds its rows' column sums once; each decode
step adds its own row. This gives the same tokens as masked-mode `h2o` over the whole sequence with
the prompt rows dense (`SparseSettings(dense_rows=P)`), at the cost of one row per step.
"""

from __future__ import annotations

import torch

from keyspace.loki.core import Budget

PREFILL_ROWS_PER_CHUNK = 1024  # bounds the (rows, S) probability block of the prefill's column sums
CHUNK_ELEMENTS = 2**29  # and the whole (B, H, rows, S) block: 2 GiB of float32 per temporary


def column_sums(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax weights summed over query rows: query, key (B, H, S, D) -> (B, H, S) float32."""
    length = key.shape[-2]
    total = torch.zeros(*key.shape[:2], length, dtype=torch.float32, device=key.device)
    positions = torch.arange(length, device=key.device)
    per_row = query.shape[0] * query.shape[1] * length
    chunk = max(1, min(PREFILL_ROWS_PER_CHUNK, CHUNK_ELEMENTS // per_row))
    for start in range(0, length, chunk):
        rows = query[:, :, start : start + chunk]
        logits = (rows @ key.transpose(-1, -2)).float() * scale  # [B, H, c, S]
        visible = positions[None, :] <= positions[start : start + rows.shape[-2], None]
        total += torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).sum(dim=-2)
    return total


class HeavyHitters:
    """The attention handler of one H2O decode (a fresh one per prompt), keeping ceil(k·S) keys
    per step for a fraction k, or min(budget, S) for a token `budget` (Loki's `Budget` rule)."""

    def __init__(self, k: float | None = None, budget: int | None = None):
        self.rule = Budget(k, budget)
        self.scores: dict[int, torch.Tensor] = {}  # layer -> (B, Hq, S) accumulated attention

    def __call__(self, module, query, key, value, scale):
        """query (B, Hq, T, D), key/value (B, Hkv, S, D) with the cache -> (B, T, Hq, D)."""
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        if query.shape[-2] == 1:
            return self.step(module.layer_idx, query, key, value, scale)
        if query.shape[-2] != key.shape[-2]:
            raise ValueError("the H2O decode path prefills from an empty cache only")
        self.scores[module.layer_idx] = column_sums(query, key, scale)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale
        )
        return out.transpose(1, 2).contiguous()

    def step(self, layer: int, query, key, value, scale: float) -> torch.Tensor:
        """One decode row: add its dense weights to the scores, keep the top budget, attend exactly."""
        length = key.shape[-2]
        logits = (query @ key.transpose(-1, -2)).float() * scale  # [B, Hq, 1, S]
        seen = self.scores[layer]
        scores = torch.nn.functional.pad(seen, (0, length - seen.shape[-1]))
        scores = scores + torch.softmax(logits, dim=-1)[:, :, 0]
        self.scores[layer] = scores
        budget = self.rule.kept(length)
        recent = budget - budget // 2
        ranked = scores.clone()
        ranked[..., length - recent :] = float("inf")
        index = ranked.topk(budget, dim=-1).indices  # [B, Hq, budget]
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
        logits = logits.masked_fill(~keep[:, :, None], float("-inf"))
        out = torch.softmax(logits, dim=-1).to(value.dtype) @ value  # [B, Hq, 1, D]
        return out.transpose(1, 2).contiguous()
