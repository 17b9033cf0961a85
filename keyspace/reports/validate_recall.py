"""The validate report's recall section: recall against the rank that fits each basis, per KV head.

validate.json records recall per (layer, query head) and the rank of the query head's KV head,
repeated over the group. Rank varies per KV head only, so a correlation over query heads counts
each rank G times and overstates its p-value. Here recall is averaged over each KV head's group
and ρ and p are Spearman's over (layer, KV head). The key basis is read against the key rank; the
query-aware basis against the score rank (the dimensions that basis needs), when recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from keyspace.reports import figures, html
from keyspace.reports import validate_figures as vf

RECALLS = (
    ("topk_recall", "top-k recall"),
    ("mass_recall", "attention-mass recall"),
    ("relative_mass_recall", "mass / exact top-k mass"),
)


@dataclass(frozen=True)
class KvRecall:
    """One recall of one (d, k, basis) entry per (layer, KV head): `rank` and `recall` are
    (layers, kv_heads); `rank_name` says which rank ('key rank' or 'score rank')."""

    entry: dict
    rank: np.ndarray
    recall: np.ndarray
    rank_name: str
    group: int
    rho: float | None
    p: float | None

    @property
    def n(self) -> int:
        return self.rank.size


def group_size(per_query_head: np.ndarray) -> int:
    """G, the query heads per KV head: the largest block of consecutive query heads over which
    every layer's rank is constant (1 when ranks differ between neighbours)."""
    heads = per_query_head.shape[1]
    for g in sorted((g for g in range(1, heads + 1) if heads % g == 0), reverse=True):
        blocks = per_query_head.reshape(per_query_head.shape[0], heads // g, g)
        if (blocks == blocks[..., :1]).all():
            return g
    return 1


def rank_field(entry: dict) -> tuple[str, str]:
    """(validate.json field, its name): the score rank for the query-aware basis when recorded."""
    if entry.get("basis") == "query-aware" and entry.get("score_rank"):
        return "score_rank", "score rank"
    return "rank", "key rank"


def kv_recall(entry: dict, field: str) -> KvRecall:
    """The entry's `field` recall averaged over each KV head's query heads, with Spearman's ρ and
    p over (layer, KV head) against the rank that fits its basis."""
    name, label = rank_field(entry)
    per_query = np.asarray(entry[name], dtype=float)  # [layers, q_heads]
    g = group_size(per_query)
    layers, heads = per_query.shape
    rank = per_query[:, ::g]  # [layers, kv_heads]
    recall = np.asarray(entry[field], dtype=float).reshape(layers, heads // g, g).mean(axis=2)
    rho = p = None
    if np.ptp(rank) > 0 and np.ptp(recall) > 0:
        stat = spearmanr(rank.ravel(), recall.ravel())
        rho, p = float(stat.statistic), float(stat.pvalue)
    return KvRecall(entry, rank, recall, label, g, rho, p)


def recall_table(doc: dict, fields: list[tuple[str, str]]) -> str:
    """Per (basis, d, k) and recall: its mean, and Spearman's ρ and p over KV heads."""
    from keyspace.reports.validate_tables import basis_cells, basis_headers, fmt_d, fmt_k

    headers = [*basis_headers(doc), "d", "k", "k-mode", "rows", "recall", "mean"]
    headers += ["ρ with rank", "rank", "p", "n (layer × KV head)"]
    rows, attrs = [], []
    for e in doc["recall"]:
        for i, (field, title) in enumerate(fields):
            cells = [*basis_cells(doc, e), fmt_d(e), fmt_k(e), e["k_mode"], e["rows"], title]
            mean = float(np.mean(np.asarray(e[field], dtype=float)))
            if e.get("rank"):
                kv = kv_recall(e, field)
                rho = "n/a" if kv.rho is None else f"{kv.rho:+.2f}"
                p = "n/a" if kv.p is None else f"{kv.p:.1g}"
                cells += [f"{mean:.3f}", rho, kv.rank_name, p, kv.n]
            else:
                cells += [f"{mean:.3f}", "n/a", "not recorded", "n/a", "-"]
            rows.append(cells)
            attrs.append({"class": "group" if i == 0 and rows[:-1] else "", "data-field": field})
    return html.table(headers, rows, "recall", row_attrs=attrs)


def recall_section(doc: dict) -> tuple[str, list[html.Png]]:
    entries = doc["recall"]
    fields = [(f, t) for f, t in RECALLS if all(f in e for e in entries)]
    note = html.paragraph(
        "How well Loki's low-rank scores pick the tokens exact attention would: top-k recall is"
        " the share of the exact top-k tokens kept; attention-mass recall is the share of"
        " attention probability on the kept tokens; mass / exact top-k mass divides that by the"
        " mass the exact top-k tokens hold, the best any selection of k tokens can do. Means are"
        " over (layer, query head) and rows whose budget is below their context. ρ and p are"
        " Spearman's over (layer, KV head), with recall averaged over each KV head's query heads:"
        " rank varies per KV head only. The key basis is read against its key rank, the"
        " query-aware basis against its score rank (the coordinates that hold 90% of the score"
        " energy q·k).",
        "note",
    )
    parts, pngs = [note, recall_table(doc, fields)], []
    ranked = [e for e in entries if e.get("rank")]
    tau = ranked[0].get("rank_threshold", 0.9) if ranked else 0.9
    kind = ranked[0].get("rank_kind", doc["rotary"]) if ranked else doc["rotary"]
    for rank_name in dict.fromkeys(rank_field(e)[1] for e in ranked):
        group = [e for e in ranked if rank_field(e)[1] == rank_name]
        slug = rank_name.replace(" ", "_")
        made = [
            figures.to_png(
                vf.recall_vs_rank(
                    [kv_recall(e, f) for e in group], t, f"{rank_name}@{tau:g} ({kind}-RoPE)"
                ),
                f"validate_recall_vs_{slug}-{f}.png",
            )
            for f, t in fields
        ]
        pngs += made
        which = "keys" if rank_name == "key rank" else "scores q·k"
        parts.append(
            html.figure(
                made,
                f"Each recall of every (layer, KV head), mean over its query heads, against its"
                f" {rank_name} (the {which}' dimensions for {tau:.0%}), one colour per (d, k);"
                " ρ is Spearman's over those points. Ranks are integers, so points are spread"
                " ±0.3 sideways. Hover a point for its layer and head.",
            )
        )
    made = [
        figures.to_png(vf.recall_per_layer(entries, f, t), f"validate_recall_per_layer-{f}.png")
        for f, t in fields
        if all(f in e["per_layer"] for e in entries)
    ]
    pngs += made
    if made:
        parts.append(
            html.figure(made, "Each recall per layer, mean over query heads, one line per (d, k).")
        )
    return html.section("Dimensionality → accuracy", parts, "recall"), pngs
