"""Pure plotting for the rank report: arrays in, matplotlib Figure out. No torch, no files.

Every function builds a new figure under the non-interactive Agg backend; `to_png` renders it
and closes it, so a long report never accumulates open figures. Figures are at most
`MAX_WIDTH_IN` wide, so at their CSS size (DPI px per inch) they fit the page at 1366 px and
their fonts never shrink below legibility.
"""

from __future__ import annotations

import functools
import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from keyspace.reports.html import Png  # noqa: E402

KIND_COLORS = {"pre": "#1f77b4", "post": "#d62728"}
KIND_TITLES = {"pre": "pre-RoPE", "post": "post-RoPE"}
# The three spectra of a run with queries: the keys' variance, the queries' energy, the scores'.
SPECTRUM_COLORS = {"key": "#1f77b4", "query": "#2ca02c", "score": "#9467bd"}
SPECTRUM_TITLES = {"key": "keys", "query": "queries", "score": "scores q·k"}
# CSS pixels per inch; figures are drawn at PIXEL_RATIO times that for high-density screens.
DPI = 110
PIXEL_RATIO = 2
MAX_WIDTH_IN = 10.0
FONT = {"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 10, "figure.titlesize": 11}
# Annotate heatmap cells only while they stay legible.
MAX_ANNOTATED_CELLS = 400


@dataclass(frozen=True)
class HeadCurve:
    """One (layer, head) to draw in every kind's panel, in one colour.

    ratios[kind]: its explained-variance ratios (head_dim,), descending.
    """

    label: str
    ratios: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if any(r.ndim != 1 for r in self.ratios.values()):
            raise ValueError("HeadCurve.ratios must be 1-D (head_dim,) per kind")


def to_png(fig: Figure, name: str) -> Png:
    """Render `fig` as a PNG named `name` (the file it gets beside the page) and close it, with
    the hover targets of scatter points that carry `tooltips` and the figure's smallest text."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI * PIXEL_RATIO, bbox_inches="tight")
        tips, smallest = point_tips(fig), min_font_px(fig)
    finally:
        plt.close(fig)
    return Png(name, buffer.getvalue(), PIXEL_RATIO, tips, smallest)


def min_font_px(fig: Figure) -> float:
    """The smallest visible text in `fig`, in CSS pixels at the figure's own size."""
    sizes = [
        t.get_fontsize()
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_figure() is not None
    ]
    return min(sizes) * DPI / 72 if sizes else 0.0


def point_tips(fig: Figure) -> tuple[tuple[float, float, float, str], ...]:
    """(x, y, radius, text) in CSS pixels of the saved (tight-cropped) PNG for every point of a
    scatter collection given a `tooltips` list, one text per point."""
    marked = [(ax, c) for ax in fig.axes for c in ax.collections if getattr(c, "tooltips", None)]
    if not marked:
        return ()
    renderer = fig.canvas.get_renderer()
    box = fig.get_tightbbox(renderer).padded(plt.rcParams["savefig.pad_inches"])  # inches
    tips = []
    for ax, collection in marked:
        centers = ax.transData.transform(collection.get_offsets())  # display px at fig.dpi
        radius = max(3.0, (collection.get_sizes()[0] ** 0.5) / 2 * DPI / 72 + 1)
        for (x, y), text in zip(centers, collection.tooltips, strict=True):
            left, top = (x / fig.dpi - box.x0) * DPI, (box.y1 - y / fig.dpi) * DPI
            tips.append((round(left, 1), round(top, 1), round(radius, 1), text))
    return tuple(tips)


def styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under the report's font sizes without touching matplotlib's global settings."""

    @functools.wraps(plot)
    def draw(*args, **kwargs) -> Figure:
        with plt.rc_context(FONT):
            return plot(*args, **kwargs)

    return draw


def new_figure(**subplots) -> tuple[Figure, np.ndarray]:
    """plt.subplots, always with a 2-D array of axes."""
    return plt.subplots(squeeze=False, **subplots)


def wrap(title: str, width_in: float) -> str:
    """Break a title into lines that fit a figure `width_in` wide (about 9 characters an inch)."""
    return "\n".join(textwrap.wrap(title, max(20, int(width_in * 9))))


def color_floor(arrays: list[np.ndarray]) -> float:
    """Lower end of a [.., 1] color scale: 0.5, or lower in steps of 0.1 to include every value."""
    low = min(float(np.nanmin(a)) for a in arrays)
    return min(0.5, np.floor(low * 10) / 10)


@styled
def rank_heatmaps(ranks: dict[str, np.ndarray], head_dim: int, tau: float, title: str) -> Figure:
    """Heatmaps of rank@τ, layer × KV head, one per kind, on one scale [0, head_dim].

    ranks[kind]: (layers, heads).
    """
    kinds = list(ranks)
    layers, heads = ranks[kinds[0]].shape
    width = min(MAX_WIDTH_IN, 2.0 + (1.8 + 0.4 * heads) * len(kinds))
    fig, axes = new_figure(
        ncols=len(kinds), figsize=(width, max(3.4, 0.26 * layers + 1.8)), layout="constrained"
    )
    annotate = layers * heads <= MAX_ANNOTATED_CELLS
    for ax, kind in zip(axes[0], kinds, strict=True):
        sns.heatmap(
            ranks[kind], ax=ax, vmin=0, vmax=head_dim, cmap="viridis", annot=annotate, fmt="d",
            annot_kws={"fontsize": 9.5}, cbar=False,
            xticklabels=[f"h{h}" for h in range(heads)], yticklabels=list(range(layers)),
        )  # fmt: skip
        ax.set_title(f"{KIND_TITLES.get(kind, kind)}")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.tick_params(axis="y", labelsize=9.5, rotation=0)
    fig.colorbar(
        axes[0][0].collections[0],
        ax=axes,
        shrink=0.6,
        label=f"rank@{tau:g} (of head_dim {head_dim})",
    )
    fig.suptitle(wrap(title, width))
    return fig


def mean_band(ax, ranks: np.ndarray, color: str | None, name: str) -> None:
    """The mean over KV heads per layer and a min–max band; ranks: (layers, heads)."""
    layers = np.arange(ranks.shape[0])
    ax.plot(layers, ranks.mean(axis=1), marker="o", markersize=3, color=color, label=f"{name} mean")
    ax.fill_between(
        layers,
        ranks.min(axis=1),
        ranks.max(axis=1),
        color=color,
        alpha=0.18,
        label=f"{name} min–max",
    )


def layer_axis(ax, head_dim: int, tau: float) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"rank@{tau:g} (of {head_dim})")
    ax.set_ylim(0, head_dim)
    ax.grid(alpha=0.3)


@styled
def per_layer_ranks(ranks: dict[str, np.ndarray], head_dim: int, tau: float, title: str) -> Figure:
    """Mean rank@τ per layer over KV heads, with a min–max band, all kinds on one axis."""
    fig, axes = new_figure(figsize=(9.0, 3.8), layout="constrained")
    ax = axes[0][0]
    for kind, r in ranks.items():
        mean_band(ax, r, KIND_COLORS.get(kind), KIND_TITLES.get(kind, kind))
    layer_axis(ax, head_dim, tau)
    ax.legend(ncol=2, loc="lower right")
    ax.set_title(wrap(title, 9.0))
    return fig


@styled
def per_layer_spectra(
    ranks: dict[str, dict[str, np.ndarray]], head_dim: int, tau: float, title: str
) -> Figure:
    """Mean rank@τ per layer of each spectrum (keys, queries, scores) with a min–max band, one
    panel per kind. ranks[kind][spectrum]: (layers, heads)."""
    kinds = list(ranks)
    fig, axes = new_figure(ncols=len(kinds), figsize=(9.5, 4.2), sharey=True, layout="constrained")
    for ax, kind in zip(axes[0], kinds, strict=True):
        for spectrum, r in ranks[kind].items():
            mean_band(ax, r, SPECTRUM_COLORS.get(spectrum), SPECTRUM_TITLES.get(spectrum, spectrum))
        layer_axis(ax, head_dim, tau)
        ax.set_title(KIND_TITLES.get(kind, kind))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle(wrap(title, 9.5))
    return fig


def head_panels(curves: list[HeadCurve], title: str, draw, ylabel: str) -> Figure:
    """One panel per kind, each head in the same colour in every panel, one legend below."""
    kinds = list(curves[0].ratios)
    fig, axes = new_figure(ncols=len(kinds), figsize=(9.5, 4.6), sharey=True, layout="constrained")
    colors = plt.get_cmap("tab10").colors
    for ax, kind in zip(axes[0], kinds, strict=True):
        for i, curve in enumerate(curves):
            draw(ax, curve.ratios[kind], color=colors[i % len(colors)], label=curve.label)
        ax.set_title(KIND_TITLES.get(kind, kind))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(wrap(title, 9.5))
    return fig


@styled
def cumulative_curves(curves: list[HeadCurve], tau: float, title: str) -> Figure:
    """Cumulative explained variance against the number of components r (log axis)."""

    def draw(ax, ratios, **style):
        ax.plot(np.arange(1, ratios.shape[0] + 1), np.cumsum(ratios), linewidth=1.6, **style)
        ax.axhline(tau, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("components r (log scale)")

    fig = head_panels(curves, title, draw, "cumulative explained variance")
    for ax in fig.axes:
        ax.text(1, tau + 0.01, f"τ = {tau:g}", fontsize=10, color="gray", va="bottom")
    return fig


@styled
def eigen_spectra(curves: list[HeadCurve], title: str) -> Figure:
    """Eigenvalues as fractions of each head's total variance, log axis."""

    def draw(ax, ratios, **style):
        index = np.arange(1, ratios.shape[0] + 1)
        ax.semilogy(index, np.clip(ratios, 1e-12, None), linewidth=1.6, **style)
        ax.set_xlabel("component index")

    return head_panels(curves, title, draw, "eigenvalue / total variance")


@styled
def transfer_heatmaps(
    labels: list[str], matrices: dict[str, dict[str, np.ndarray]], title: str
) -> Figure:
    """Grid kind × r spec of (basis run × keys run) captured-variance matrices in [0, 1]."""
    kinds = list(matrices)
    specs = list(matrices[kinds[0]])
    cell = 0.5 * len(labels) + 1.4
    vmin = color_floor([m for specs_of in matrices.values() for m in specs_of.values()])
    width = min(MAX_WIDTH_IN, cell * len(specs) + 1.4)
    fig, axes = new_figure(
        nrows=len(kinds), ncols=len(specs), figsize=(width, cell * len(kinds) + 0.8),
        layout="constrained",
    )  # fmt: skip
    for i, kind in enumerate(kinds):
        for j, spec in enumerate(specs):
            ax = axes[i][j]
            sns.heatmap(
                matrices[kind][spec], ax=ax, vmin=vmin, vmax=1.0, cmap="magma", annot=True, fmt=".3f",
                annot_kws={"fontsize": 9}, cbar=False, xticklabels=labels, yticklabels=labels, square=True,
            )  # fmt: skip
            ax.set_title(f"{KIND_TITLES.get(kind, kind)}, top {spec}", fontsize=10)
            ax.set_xlabel("keys of" if i == len(kinds) - 1 else "")
            ax.set_ylabel("basis from" if j == 0 else "")
            ax.tick_params(labelsize=9)
    fig.colorbar(
        axes[0][0].collections[0], ax=axes, shrink=0.8, label="fraction of variance captured"
    )
    fig.suptitle(wrap(title, width))
    return fig


@styled
def sequence_transfer_heatmap(
    rows: list[str], specs: list[str], values: np.ndarray, title: str
) -> Figure:
    """Captured fraction per (run · test · kind) row and r spec column; values: (rows, specs)."""
    label_in = max(len(r) for r in rows) * 0.075  # about 0.075 in per 9-pt character
    width = min(MAX_WIDTH_IN, label_in + 1.6 + 1.1 * len(specs))
    fig, axes = new_figure(figsize=(width, 0.42 * len(rows) + 1.5), layout="constrained")
    ax = axes[0][0]
    sns.heatmap(
        values, ax=ax, vmin=color_floor([values]), vmax=1.0, cmap="magma", annot=True, fmt=".3f",
        annot_kws={"fontsize": 9}, xticklabels=[f"top {s}" for s in specs], yticklabels=rows,
        cbar_kws={"label": "fraction of held-out variance"},
    )  # fmt: skip
    ax.tick_params(axis="y", rotation=0, labelsize=9)
    ax.set_title(wrap(title, width))
    return fig
