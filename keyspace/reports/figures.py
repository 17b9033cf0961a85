"""Pure plotting: arrays in, matplotlib Figure out. No torch, no files except `save_png`.

Every function builds a new figure under the non-interactive Agg backend; `save_png` writes it and
closes it, so a long report never accumulates open figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

KIND_COLORS = {"pre": "#1f77b4", "post": "#d62728"}
KIND_TITLES = {"pre": "pre-RoPE", "post": "post-RoPE"}
DPI = 110
# Annotate heatmap cells only while they stay legible.
MAX_ANNOTATED_CELLS = 400


@dataclass(frozen=True)
class HeadCurve:
    """One (layer, head) to draw: its explained-variance ratios (head_dim,), descending."""

    label: str
    ratios: np.ndarray

    def __post_init__(self) -> None:
        if self.ratios.ndim != 1:
            raise ValueError("HeadCurve.ratios must be 1-D (head_dim,)")


def color_floor(arrays: list[np.ndarray]) -> float:
    """Lower end of a [.., 1] color scale: 0.5, or lower in steps of 0.1 to include every value."""
    low = min(float(np.nanmin(a)) for a in arrays)
    return min(0.5, np.floor(low * 10) / 10)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG and close it."""
    path = Path(path)
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def rank_heatmaps(ranks: dict[str, np.ndarray], head_dim: int, tau: float, title: str) -> Figure:
    """Side-by-side heatmaps of rank@τ, layer × KV head, one per kind; ranks[kind]: (layers, heads)."""
    kinds = list(ranks)
    layers, heads = ranks[kinds[0]].shape
    height = max(3.0, 0.26 * layers + 1.6)
    fig, axes = plt.subplots(
        1,
        len(kinds),
        figsize=(1.2 + 2.6 * len(kinds) + 0.35 * heads * len(kinds), height),
        squeeze=False,
    )
    vmax = max(int(r.max()) for r in ranks.values())
    annotate = layers * heads <= MAX_ANNOTATED_CELLS
    for ax, kind in zip(axes[0], kinds, strict=True):
        sns.heatmap(
            ranks[kind], ax=ax, vmin=0, vmax=max(vmax, 1), cmap="viridis", annot=annotate, fmt="d",
            annot_kws={"fontsize": 7}, cbar_kws={"label": f"rank@{tau:g} (of {head_dim})"},
            xticklabels=[f"h{h}" for h in range(heads)], yticklabels=list(range(layers)),
        )  # fmt: skip
        ax.set_title(f"{KIND_TITLES.get(kind, kind)}: rank@{tau:g}")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.tick_params(axis="y", labelsize=7, rotation=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_layer_ranks(ranks: dict[str, np.ndarray], head_dim: int, tau: float, title: str) -> Figure:
    """Mean rank@τ per layer over KV heads, with a min–max band, all kinds on one axis."""
    fig, ax = plt.subplots(figsize=(8.0, 3.6))
    for kind, r in ranks.items():
        layers = np.arange(r.shape[0])
        color = KIND_COLORS.get(kind)
        ax.plot(
            layers,
            r.mean(axis=1),
            marker="o",
            markersize=3,
            color=color,
            label=f"{KIND_TITLES.get(kind, kind)} mean over heads",
        )
        ax.fill_between(
            layers,
            r.min(axis=1),
            r.max(axis=1),
            color=color,
            alpha=0.18,
            label=f"{KIND_TITLES.get(kind, kind)} min–max",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"rank@{tau:g} (of {head_dim})")
    ax.set_ylim(0, head_dim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def cumulative_curves(curves: dict[str, list[HeadCurve]], tau: float, title: str) -> Figure:
    """Cumulative explained variance vs number of components, one panel per kind."""
    fig, axes = plt.subplots(
        1, len(curves), figsize=(5.0 * len(curves), 3.8), squeeze=False, sharey=True
    )
    for ax, (kind, heads) in zip(axes[0], curves.items(), strict=True):
        for curve in heads:
            r = np.arange(1, curve.ratios.shape[0] + 1)
            ax.plot(r, np.cumsum(curve.ratios), label=curve.label, linewidth=1.4)
        ax.axhline(tau, color="gray", linestyle="--", linewidth=0.8)
        ax.text(1, tau + 0.01, f"τ = {tau:g}", fontsize=7, color="gray", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of components r (log scale)")
        ax.set_title(KIND_TITLES.get(kind, kind))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("cumulative explained variance")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def eigen_spectra(curves: dict[str, list[HeadCurve]], title: str) -> Figure:
    """Eigenvalues as fractions of total variance on a log axis, one panel per kind."""
    fig, axes = plt.subplots(
        1, len(curves), figsize=(5.0 * len(curves), 3.8), squeeze=False, sharey=True
    )
    for ax, (kind, heads) in zip(axes[0], curves.items(), strict=True):
        for curve in heads:
            r = np.arange(1, curve.ratios.shape[0] + 1)
            ax.semilogy(r, np.clip(curve.ratios, 1e-12, None), label=curve.label, linewidth=1.4)
        ax.set_xlabel("component index")
        ax.set_title(KIND_TITLES.get(kind, kind))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("eigenvalue / total variance")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def transfer_heatmaps(
    labels: list[str], matrices: dict[str, dict[str, np.ndarray]], title: str
) -> Figure:
    """Grid kind × r spec of (basis run × keys run) captured-variance matrices in [0, 1]."""
    kinds = list(matrices)
    specs = list(matrices[kinds[0]])
    cell = 0.55 * len(labels) + 1.6
    vmin = color_floor([m for specs_of in matrices.values() for m in specs_of.values()])
    size = (cell * len(specs) + 1.2, cell * len(kinds) + 0.6)
    fig, axes = plt.subplots(
        len(kinds), len(specs), figsize=size, squeeze=False, layout="constrained"
    )
    for i, kind in enumerate(kinds):
        for j, spec in enumerate(specs):
            ax = axes[i][j]
            sns.heatmap(
                matrices[kind][spec], ax=ax, vmin=vmin, vmax=1.0, cmap="magma", annot=True, fmt=".3f",
                annot_kws={"fontsize": 8}, cbar=False, xticklabels=labels, yticklabels=labels, square=True,
            )  # fmt: skip
            ax.set_title(f"{KIND_TITLES.get(kind, kind)}, top {spec}", fontsize=9)
            ax.set_xlabel("keys of" if i == len(kinds) - 1 else "")
            ax.set_ylabel("basis from" if j == 0 else "")
            ax.tick_params(labelsize=7)
    fig.colorbar(
        axes[0][0].collections[0], ax=axes, shrink=0.8, label="fraction of variance captured"
    )
    fig.suptitle(title, fontsize=10)
    return fig


def sequence_transfer_heatmap(
    rows: list[str], specs: list[str], values: np.ndarray, title: str
) -> Figure:
    """Captured fraction per (run · test · kind) row and r spec column; values: (rows, specs)."""
    fig, ax = plt.subplots(figsize=(3.2 + 1.5 * len(specs), 0.45 * len(rows) + 1.4))
    sns.heatmap(
        values, ax=ax, vmin=color_floor([values]), vmax=1.0, cmap="magma", annot=True, fmt=".3f", annot_kws={"fontsize": 8},
        xticklabels=[f"top {s}" for s in specs], yticklabels=rows, cbar_kws={"label": "fraction of held-out variance"},
    )  # fmt: skip
    ax.tick_params(axis="y", rotation=0, labelsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
