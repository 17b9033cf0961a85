"""Pure plotting for the validate report: validate.json's records in, matplotlib Figure out.

The records are the plain dicts of validate.json (ResultRow, recall entries, task rows); nothing here
computes a statistic that the page does not also show. Render with figures.to_png.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import seaborn as sns
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, PercentFormatter

from keyspace.loki.methods import METHODS
from keyspace.reports.figures import MAX_WIDTH_IN, new_figure, styled, wrap
from keyspace.reports.labels import place_labels, repel

OTHER_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22")
ENTRY_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
# Perplexities above this multiple of dense sit on the top edge and are named in the title.
PPL_CAP = 2.5
# The Pareto's lower panel spans dense to this multiple of it (settings within 5% stand apart).
NEAR = 1.08
NICE = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
# Task scorings, each on its own colour bar: (scoring, colour map, bar label).
TASK_SCALES = (
    ("exact", "viridis", "exact match (share of prompts)"),
    ("recall", "magma", "recall of the asked values"),
)
K_MODE_TITLES = {"window": "k per window", "row": "k per query row"}
# Task heatmap: inches a task's cell takes, and a 10-pt tick label's character.
CELL_IN = 0.6
TICK_CHAR_IN = 0.065
# The methods under test: their points are labelled and their legend tells the bases apart.
LOKI_FAMILY = ("loki", "loki-adaptive")
# A label colour lighter than this (relative luminance) is darkened to stay legible on white.
MAX_TEXT_LUMINANCE = 0.45


def method_style(method: str, methods: list[str]) -> tuple[str, str]:
    """Colour and marker: the registered method's style, else one of OTHER_COLORS with an X."""
    if method in METHODS:
        return METHODS[method].style.color, METHODS[method].style.marker
    return OTHER_COLORS[methods.index(method) % len(OTHER_COLORS)], "X"


def text_color(color: str) -> tuple[float, float, float]:
    """A marker colour made dark enough for 9-pt text on white (loki-adaptive's pale red)."""
    rgb = np.array(to_rgb(color))
    luminance = float(rgb @ [0.2126, 0.7152, 0.0722])
    if luminance <= MAX_TEXT_LUMINANCE:
        return tuple(rgb)
    return tuple(rgb * MAX_TEXT_LUMINANCE / luminance)


def fraction_label(k: float) -> str:
    """0.125 -> '1/8'; other values as %g."""
    if k > 0 and abs(1 / k - round(1 / k)) < 1e-9:
        return f"1/{round(1 / k)}"
    return f"{k:g}"


def keep_label(row: dict) -> str | None:
    """A row's budget: '2048 tok' for a token budget (`k_budget`), '1/8' for a fraction k, None
    for a method that keeps everything."""
    if row.get("k_budget") is not None:
        return f"{row['k_budget']} tok"
    return None if row.get("k") is None else fraction_label(row["k"])


def basis_suffix(row: dict) -> str:
    """', query-aware' for a row in a basis other than the paper's key basis."""
    return "" if row.get("basis") in (None, "key") else f", {row['basis']}"


def hollow(row: dict) -> bool:
    """The query-aware basis draws hollow markers, the paper's key basis filled ones."""
    return row.get("basis") == "query-aware"


def settings_label(row: dict) -> str:
    """'d=32, k=1/8' or 'd=32, k=2048 tok'; the method for a row without settings ('full')."""
    parts = [f"d={row['d']}"] if row.get("d") is not None else []
    if keep_label(row) is not None:
        parts.append(f"k={keep_label(row)}")
    return ", ".join(parts) or row["method"]


def point_label(row: dict) -> str:
    """'d=32, k=1/8, key' when the row names its basis (every row since the query-aware basis)."""
    return settings_label(row) + (f", {row['basis']}" if row.get("basis") else "")


def nice_ticks(low: float, high: float) -> list[float]:
    """Round values (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^n) spanning [low, high], at most 8."""
    ticks = [
        m * 10**e
        for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
        for m in NICE
    ]
    inside = [t for t in ticks if low <= t <= high]
    while len(inside) > 8:
        inside = inside[::2]
    return inside or [round(low, 2), round(high, 2)]


def ppl_axis(ax, values: list[float], top: float) -> None:
    """A perplexity axis with labelled ticks across the data (at least three): log when the
    values span > 2.5×."""
    values = values or [top / 1.06]
    low = min(min(values) * 0.96, min(values) - 0.1 * (top - min(values)))
    low = max(low, min(values) * 0.9)
    if top / low > 2.5:
        ax.set_yscale("log")
    ax.set_ylim(low, top)
    log = ax.get_yscale() == "log"
    ax.yaxis.set_major_locator(
        FixedLocator(nice_ticks(low, top))
        if log
        else MaxNLocator(6, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3)
    )
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter("{x:g}")
    ax.grid(alpha=0.3)


def dodge(rows: list[dict], x_of, width: float) -> dict[int, float]:
    """Spread points that share an x value sideways by up to ±width/2, keyed by id(row)."""
    groups: dict[float, list[dict]] = defaultdict(list)
    for row in rows:
        groups[round(x_of(row), 6)].append(row)
    shifts = {}
    for group in groups.values():
        step = width / max(1, len(group) - 1) if len(group) > 1 else 0.0
        for i, row in enumerate(sorted(group, key=lambda r: r["ppl"])):
            shifts[id(row)] = (i - (len(group) - 1) / 2) * step
    return shifts


def draw_points(ax, rows, x_of, methods, top, label_methods=LOKI_FAMILY, dodge_width=0.0):
    """Scatter rows by method and label the methods under test. Rows above `top` sit on the top
    edge. Returns (the labels, to place with `repel`; 'name: value' of each row above `top`)."""
    shifts = dodge(rows, x_of, dodge_width)
    labels, off_scale = [], []
    for row in rows:
        color, marker = method_style(row["method"], methods)
        x, y = x_of(row) + shifts[id(row)], row["ppl"]
        if y > top:
            ax.scatter(x, top, color=color, marker=6, s=80, clip_on=False, zorder=3)
            off_scale.append(f"{row['method']} {point_label(row)}: {y:.1f}")
            continue
        size = 160 if row["method"] == "full" else 90 if row["method"] in LOKI_FAMILY else 55
        if hollow(row):
            ax.scatter(x, y, marker=marker, s=size, facecolor="white", edgecolor=color, lw=1.8,
                       zorder=3)  # fmt: skip
        else:
            ax.scatter(x, y, color=color, marker=marker, s=size, edgecolor="white", lw=0.6,
                       zorder=3)  # fmt: skip
        if row["method"] in label_methods:
            named = row["method"] != "loki"  # the plain method needs no name; a sibling does
            labels.append(
                ax.annotate(
                    f"{row['method']} {point_label(row)}" if named else point_label(row),
                    (x, y),
                    xytext=(7, 0),
                    va="center",
                    textcoords="offset points",
                    fontsize=9,
                    color=text_color(color),
                    zorder=2.5,
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
                )
            )
    return labels, off_scale


def legend_columns(names: list[str], width: float) -> int:
    """The most legend columns that fit across `width` inches, at least one. Matplotlib fills
    the columns top to bottom, the first len % ncol of them one entry longer; a column is as
    wide as its longest name (a 10-pt character about 0.075 in) plus a marker and the gaps
    (about 0.6 in)."""
    for ncol in range(len(names), 1, -1):
        rows, long = divmod(len(names), ncol)
        sizes = [rows + 1] * long + [rows] * (ncol - long)
        starts = np.cumsum([0, *sizes])
        columns = [names[a:b] for a, b in zip(starts, starts[1:], strict=False)]
        if sum(0.6 + 0.075 * max(map(len, c)) for c in columns) <= width:
            return ncol
    return 1


def method_legend(
    fig: Figure, methods: list[str], width: float, key: list[str] = (), bases: list[str] = ()
) -> None:
    """One marker per method, and for Loki one per basis (filled: key, hollow: query-aware);
    then `key`, the names of numbered point labels, if any."""
    handles = []
    for method in methods:
        color, marker = method_style(method, methods)
        label = "dense (full)" if method == "full" else method
        for basis in (bases or [None]) if method in LOKI_FAMILY else [None]:
            face = "white" if basis == "query-aware" else color
            named = f"{label} ({basis} basis)" if basis else label
            (handle,) = fig.axes[0].plot([], [], ls="", color=color, marker=marker, ms=8,
                                         mfc=face, mew=1.6, label=named)  # fmt: skip
            handles.append(handle)
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=legend_columns([h.get_label() for h in handles], width),
        frameon=False,
    )
    if key:
        blank = [fig.axes[0].plot([], [], ls="", label=k)[0] for k in key]
        fig.legend(
            handles=blank,
            loc="outside right upper",
            frameon=False,
            handlelength=0,
            handletextpad=0,
            fontsize=8.5,
        )


def pareto_modes(rows: list[dict], k_modes: list[str]) -> list[str | None]:
    """The k-modes that have rows, in `k_modes` order: one Pareto panel each."""
    return [m for m in k_modes if any(r["k_mode"] == m for r in rows)] or [None]


@styled
def pareto(rows: list[dict], mode: str | None, width: float = 8.0) -> Figure:
    """Perplexity against the share of dense KV bytes read, for the rows of one k-mode.

    rows: validate.json results; methods without a k-mode (dense, pcaattn) appear in every mode.
    With dense measured, the axis breaks: the lower panel spans dense to NEAR × dense, so
    settings within a few percent of dense stand apart; the upper one holds the rest. A row
    far above them (PCAAttn) sits on the top edge, named in the title with its value.
    """
    methods = sorted(
        {r["method"] for r in rows},
        key=lambda m: (m not in LOKI_FAMILY, m != "full", m != "loki", m),
    )
    dense = next((r["ppl"] for r in rows if r["method"] == "full"), None)
    shown = [r for r in rows if r["k_mode"] in (mode, None)]
    own = [r["ppl"] for r in shown if r["k_mode"] == mode] or [r["ppl"] for r in shown]
    cap = (dense or min(own)) * PPL_CAP
    top = max(min(max(own), cap), dense or 0) * 1.06
    near = [r for r in shown if dense and r["ppl"] <= dense * NEAR]
    far = [r for r in shown if r not in near]
    split = bool(far) and any(r["method"] != "full" for r in near)  # else nothing to tell apart
    fig, axes = new_figure(
        nrows=2 if split else 1, sharex=True, layout="constrained",
        figsize=(width, 6.2 if split else 5.4),
        **({"gridspec_kw": {"height_ratios": [1, 1.6]}} if split else {}),
    )  # fmt: skip
    panels = (
        [(axes[0][0], far, top), (axes[1][0], near, dense * NEAR)]
        if split
        else [(axes[0][0], shown, top)]
    )
    labels, off_scale = [], []
    for ax, points, ceiling in panels:
        made, off = draw_points(
            ax, points, lambda r: r["kv_bytes_fraction"], methods, ceiling, dodge_width=0.03
        )
        labels, off_scale = labels + made, off_scale + off
        values = [r["ppl"] for r in points if r["ppl"] <= ceiling]
        if dense and (not split or ax is panels[1][0]):
            dense_line(ax, dense)
            values.append(dense)
        ppl_axis(ax, values, ceiling)
        ax.set_xlim(0, 1.08)
    if split:
        broken_axis(panels[0][0], panels[1][0])
    low = panels[-1][0]
    low.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    low.set_xlabel("KV bytes read per decode step (% of dense)")
    fig.supylabel("perplexity (lower is better)", fontsize=10)
    title = K_MODE_TITLES.get(mode, mode or "")
    if split:
        title += f" · lower panel: within {NEAR - 1:.0%} of dense"
    if off_scale:
        title += "\n" + wrap("▲ off the scale: " + "; ".join(off_scale), width)
    panels[0][0].set_title(title.strip(), fontsize=10)
    present = [m for m in methods if any(r["method"] == m for r in shown)]
    bases = sorted(  # the paper's key basis first
        {r["basis"] for r in shown if r["method"] in LOKI_FAMILY and r.get("basis")},
        key=lambda b: (b != "key", b),
    )
    bases = bases if len(bases) > 1 or bases == ["query-aware"] else []  # hollow: say why
    place_labels(fig, labels, lambda key: method_legend(fig, present, width, key, bases))
    return fig


def broken_axis(upper, lower) -> None:
    """Mark the gap between two stacked panels of one axis with the usual diagonal ticks."""
    upper.spines.bottom.set_visible(False)
    lower.spines.top.set_visible(False)
    upper.tick_params(bottom=False, labelbottom=False)
    marks = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 10, "linestyle": "none",
             "color": "k", "mec": "k", "mew": 1, "clip_on": False}  # fmt: skip
    upper.plot([0, 1], [0, 0], transform=upper.transAxes, **marks)
    lower.plot([0, 1], [1, 1], transform=lower.transAxes, **marks)


def dense_line(ax, dense: float) -> None:
    ax.axhline(dense, color="black", ls=":", lw=0.9, zorder=1)
    ax.annotate(
        f"dense {dense:.2f}", (0, dense), xycoords=("axes fraction", "data"), xytext=(4, 3),
        textcoords="offset points", fontsize=8.5, va="bottom",
    )  # fmt: skip


@styled
def measured_pareto(points: list[tuple[dict, float]], dense_ppl: float | None) -> Figure:
    """Perplexity against measured Loki time / dense SDPA time; points: (result row, ratio)."""
    fig, axes = new_figure(figsize=(8.0, 4.4), layout="constrained")
    ax = axes[0][0]
    rows = [dict(row, ratio=ratio) for row, ratio in points]
    top = max(r["ppl"] for r in rows) * 1.06
    labels, _ = draw_points(ax, rows, lambda r: r["ratio"], ["loki"], top)
    ax.axvline(1.0, color="grey", ls="--", lw=0.9)
    ax.text(1.0, top, " dense SDPA", va="top", fontsize=9, color="grey")
    if dense_ppl:
        dense_line(ax, dense_ppl)
    values = [r["ppl"] for r in rows] + ([dense_ppl] if dense_ppl else [])
    ppl_axis(ax, values, top)
    ratios = [r["ratio"] for r in rows] + [1.0]
    ax.set_xlim(min(ratios) * 0.85, max(ratios) * 1.2)
    ax.set_xlabel("measured decode-step time, Loki / dense SDPA (lower is faster)")
    ax.set_ylabel("perplexity (lower is better)")
    repel(fig, labels)
    return fig


def entry_label(entry: dict) -> str:
    return f"d={entry['d']}, k={keep_label(entry)}{basis_suffix(entry)}"


@styled
def recall_vs_rank(points: list, title: str, rank_label: str) -> Figure:
    """One recall of every (layer, KV head) against its rank, a colour per (d, k, basis).

    points: KvRecall records (validate_recall.kv_recall): `.rank` and `.recall` (layers,
    kv_heads), `.rho`, `.entry`. Ranks are integers, so each point is shifted sideways by up to
    ±0.3 to show how many share one. Each point carries its (layer, KV head) as a tooltip.
    """
    fig, axes = new_figure(figsize=(3.8, 4.1), layout="constrained")
    ax = axes[0][0]
    jitter = np.random.default_rng(0)
    for i, kv in enumerate(points):
        layers, heads = np.indices(kv.rank.shape)
        rho = "n/a" if kv.rho is None else f"{kv.rho:+.2f}"
        x = kv.rank.ravel() + jitter.uniform(-0.3, 0.3, kv.rank.size)
        color = ENTRY_COLORS[i % len(ENTRY_COLORS)]
        dots = ax.scatter(x, kv.recall.ravel(), s=14, alpha=0.6, color=color, lw=0,
                          label=f"{entry_label(kv.entry)}: ρ {rho}")  # fmt: skip
        dots.tooltips = [
            f"layer {layer}, KV head {head}: {kv.rank_name} {rank:g}, {title} {value:.3f}"
            f" ({entry_label(kv.entry)})"
            for layer, head, rank, value in zip(
                layers.ravel(), heads.ravel(), kv.rank.ravel(), kv.recall.ravel(), strict=True
            )
        ]
    ax.set_xlabel(rank_label)
    ax.set_ylabel(f"{title}, mean over the group")
    ax.set_title(wrap(f"{title} vs rank", 3.8))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=1, frameon=False, markerscale=1.6)
    return fig


@styled
def recall_per_layer(entries: list[dict], field: str, title: str) -> Figure:
    """One recall per layer (mean over query heads), a line per (d, k)."""
    fig, axes = new_figure(figsize=(3.8, 3.5), layout="constrained")
    ax = axes[0][0]
    for i, entry in enumerate(entries):
        values = entry["per_layer"][field]
        color = ENTRY_COLORS[i % len(ENTRY_COLORS)]
        ax.plot(values, marker="o", ms=3, color=color, label=entry_label(entry))
    low = min(min(e["per_layer"][field]) for e in entries)
    ax.set_ylim(min(0.5, math.floor(low * 10) / 10), 1.01)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{title}, mean over heads")
    ax.set_title(wrap(f"{title} per layer", 3.8))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, frameon=False, fontsize=8.5)
    return fig


def task_method(row: dict) -> str:
    """The method, with its basis when that is not the default key basis: 'loki (query-aware)'."""
    basis = row.get("basis")
    return row["method"] if basis in (None, "key") else f"{row['method']} ({basis})"


def task_variant(row: dict) -> str:
    """'loki d=32, k=1/8' or 'loki (query-aware) d=32, k=1/8'; the method alone for 'full'."""
    label = settings_label(row)
    return task_method(row) if label == row["method"] else f"{task_method(row)} {label}"


@styled
def task_heatmap(rows: list[dict]) -> Figure:
    """Accuracy per (method setting, task), one panel per prompt length; rows: validate.json tasks.

    Dense first, then Loki, then the baselines in the rows' order; a cell not measured is blank.
    """
    lengths = sorted({r["length"] for r in rows})
    ordered = sorted(rows, key=lambda r: (r["method"] != "full", r["method"] != "loki"))
    variants = list(dict.fromkeys(task_variant(r) for r in ordered))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    # the row names ('loki-adaptive (query-aware) d=16, k=2048 tok'), the cells (0.6 in a task,
    # enough for '0.98' at 9 pt) and the colour bars, each given its room: a fixed width let
    # long names squeeze the cells until their numbers spilled over each other
    label_in = max(len(v) for v in variants) * TICK_CHAR_IN
    panels_in = (CELL_IN * len(tasks) + 0.3) * len(lengths)
    width = min(MAX_WIDTH_IN, label_in + panels_in + 1.0 * len(TASK_SCALES))
    fig, axes = new_figure(
        ncols=len(lengths),
        figsize=(width, 1.9 + 0.32 * len(variants) + 0.06 * max(map(len, tasks))),
        layout="constrained",
    )
    scoring = {r["task"]: r.get("scoring") or "exact" for r in rows}
    scales = [(name, cmap, label) for name, cmap, label in TASK_SCALES if name in scoring.values()]
    for i, (ax, length) in enumerate(zip(axes[0], lengths, strict=True)):
        grid = np.full((len(variants), len(tasks)), np.nan)  # [variant, task]
        for r in rows:
            if r["length"] == length:
                grid[variants.index(task_variant(r)), tasks.index(r["task"])] = r["accuracy"]
        for name, cmap, _ in scales:  # exact-match and recall tasks on their own colour scales
            other = np.array([[scoring[t] != name for t in tasks]] * len(variants))
            sns.heatmap(
                grid, ax=ax, mask=other | np.isnan(grid), vmin=0, vmax=1, cmap=cmap, annot=True,
                fmt=".2f", annot_kws={"fontsize": 9}, cbar=False, xticklabels=tasks,
                yticklabels=variants if i == 0 else False,
            )  # fmt: skip
        ax.set_title(f"{length} tokens")
        # slanted to the right and anchored at their tick, so neighbouring names never meet
        for label in ax.get_xticklabels():
            label.set(rotation=40, ha="right", rotation_mode="anchor")
        ax.tick_params(axis="y", rotation=0)
    for mesh, (_, _, label) in zip(axes[0][0].collections, scales, strict=True):
        fig.colorbar(mesh, ax=axes, shrink=0.7, label=label)
    return fig
