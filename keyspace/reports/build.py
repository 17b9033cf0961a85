"""The rank report: analyze runs (if needed), measure transfer, draw figures, assemble index.html.

Compute happens in keyspace.analyze / keyspace.transfer; this module turns their results into
plain numbers, figures (figures.py) and HTML (html.py). All numbers shown come from the same
Analysis objects whose ranks file is on disk, so the page and the JSON agree by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keyspace.analyze import (
    Analysis,
    AnalyzeConfig,
    analyze_and_write,
    analyze_run,
    is_current,
    summary_json,
)
from keyspace.errors import KeyspaceError
from keyspace.reports import figures, html
from keyspace.store import DEFAULT_THRESHOLD, RunFolder
from keyspace.transfer import (
    CorpusTransfer,
    SequenceTransfer,
    across_corpora,
    across_sequences,
    r_specs,
    require_same_model,
)

FIGURE_TAU = DEFAULT_THRESHOLD


@dataclass
class Report:
    """What rank-report produced. index is None when only numbers were asked for."""

    labels: list[str]
    analyses: list[Analysis]
    corpus_transfer: CorpusTransfer | None
    sequence_transfer: list[SequenceTransfer]
    reanalyzed: list[bool]
    index: Path | None = None
    pngs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (
            len(self.labels)
            == len(self.analyses)
            == len(self.sequence_transfer)
            == len(self.reanalyzed)
        ):
            raise ValueError("Report: one label, analysis, sequence transfer and flag per run")

    @property
    def warnings(self) -> list[str]:
        return [w for a in self.analyses for w in a.warnings]

    def to_json(self) -> dict:
        return {
            "runs": [
                {"label": label, **summary_json(a)}
                for label, a in zip(self.labels, self.analyses, strict=True)
            ],
            "transfer": {
                "corpora": self.corpus_transfer.to_json() if self.corpus_transfer else None,
                "sequences": [s.to_json() for s in self.sequence_transfer],
            },
            "index": str(self.index) if self.index else None,
            "pngs": [str(p) for p in self.pngs],
        }


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique labels: the folder name, or parent/name where names collide."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    labels = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return labels if len(set(labels)) == len(labels) else [f"{i}:{n}" for i, n in enumerate(names)]


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "run"


def prepare_out(out: Path) -> Path:
    """Create --out and prove it is writable, before any compute."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".keyspace-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise KeyspaceError(
            f"cannot write the report to {out} ({err.strerror or err}).",
            "Pass a writable folder with --out.",
        ) from None
    return out


def ensure_analysis(path: Path, config: AnalyzeConfig) -> tuple[Analysis, bool]:
    """The run's analysis; (re)writes the ranks and calibration files when they are missing or stale."""
    if is_current(path, config):
        return analyze_run(path, config), False
    return analyze_and_write(path, config), True


def build_report(run_paths: list[str | Path], out: Path | None, config: AnalyzeConfig) -> Report:
    """Analyze every run, measure transfer, and (when `out` is given) write index.html + PNGs."""
    paths = [Path(p) for p in run_paths]
    if not paths:
        raise KeyspaceError(
            "no run folder given.", "Pass one or more run folders written by `keyspace collect`."
        )
    if out is not None:
        prepare_out(out)
    runs = [RunFolder.open(p).require_complete() for p in paths]
    require_same_model(runs)
    labels = run_labels(paths)
    done = [ensure_analysis(p, config) for p in paths]
    corpora = across_corpora(paths, labels, config.centered) if len(paths) > 1 else None
    sequences = [
        across_sequences(p, label, config.centered) for p, label in zip(paths, labels, strict=True)
    ]
    report = Report(labels, [a for a, _ in done], corpora, sequences, [w for _, w in done])
    if out is not None:
        render(report, out)
    return report


# ---- numbers for tables ---------------------------------------------------------------------


def short(identity: str, keep: int = 16) -> str:
    """A long content hash shortened for tables; the full identity is in the page subtitle."""
    return identity if len(identity) <= keep + 1 else identity[:keep] + "…"


def model_name(a: Analysis) -> str:
    return a.model_spec or short(a.model_identity)


def fmt_rank(value: float) -> str:
    return f"{value:.2f}"


def fmt_pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def runs_table(report: Report) -> str:
    headers = [
        "Run",
        "Model",
        "Identity",
        "Corpus",
        "Tokens",
        "head_dim",
        "PCA",
        "Kept keys",
    ]
    rows = []
    for label, a in zip(report.labels, report.analyses, strict=True):
        kept = "yes" if RunFolder.open(a.run).has_kept_keys else "no"
        mode = "centered" if a.config.centered else "uncentered"
        rows.append(
            [
                label,
                a.model_spec or "?",
                short(a.model_identity),
                a.corpus,
                a.tokens,
                a.head_dim,
                mode,
                kept,
            ]
        )
    return html.wide(table(headers, rows, "runs"))


def summary_table(report: Report) -> str:
    """Per run and τ: mean/median/min–max rank, pre vs post, with % of head_dim."""
    headers = [
        "Run",
        "τ",
        "pre mean",
        "pre median",
        "pre min–max",
        "post mean",
        "post median",
        "post min–max",
    ]
    rows, row_attrs = [], []
    for label, a in zip(report.labels, report.analyses, strict=True):
        for tau in a.thresholds:
            row: list[object] = [label, f"{tau:g}"]
            for kind in ("pre", "post"):
                s = a.kinds[kind].summary[tau]
                row += [
                    f"{fmt_rank(s.mean)} ({fmt_pct(s.mean / s.head_dim)})",
                    f"{s.median:g} ({fmt_pct(s.median / s.head_dim)})",
                    f"{s.min}–{s.max}",
                ]
            rows.append(row)
            row_attrs.append({"data-run": label, "data-tau": repr(float(tau))})
    return html.wide(table(headers, rows, "summary", row_attrs=row_attrs))


def per_head_table(label: str, a: Analysis) -> str:
    """One row per (layer, KV head): rank at every τ, pre and post, and the top component's share."""
    taus = a.thresholds
    headers = (
        ["layer", "KV head"]
        + [f"{kind} rank@{t:g}" for kind in ("pre", "post") for t in taus]
        + ["pre top-1 share", "post top-1 share"]
    )
    rows = []
    for layer in range(a.num_layers):
        for head in range(a.num_kv_heads):
            row: list[object] = [layer, head]
            row += [
                int(a.kinds[kind].ranks[t][layer, head]) for kind in ("pre", "post") for t in taus
            ]
            row += [
                fmt_pct(float(a.kinds[kind].explained_variance_ratio[layer, head, 0]))
                for kind in ("pre", "post")
            ]
            rows.append(row)
    return html.scroll_box(table(headers, rows, "per-head", {"data-run": label}))


def table(headers, rows, css_class, attrs=None, row_attrs=None) -> str:
    return html.table(headers, rows, css_class, attrs, row_attrs)


# ---- figures --------------------------------------------------------------------------------


def head_selection(ranks: np.ndarray, ratios: np.ndarray) -> list[figures.HeadCurve]:
    """Median-rank head of the first, middle and last layer, then the lowest- and highest-rank heads.

    ranks: (layers, heads) rank@0.9; ratios: (layers, heads, head_dim).
    """
    layers = ranks.shape[0]
    picks: dict[tuple[int, int], list[str]] = {}
    for layer in sorted({0, layers // 2, layers - 1}):
        head = int(np.argsort(ranks[layer], kind="stable")[(ranks.shape[1] - 1) // 2])
        picks.setdefault((layer, head), [])
    for role, flat in (("lowest", np.argmin(ranks)), ("highest", np.argmax(ranks))):
        layer, head = np.unravel_index(int(flat), ranks.shape)
        picks.setdefault((int(layer), int(head)), []).append(role)
    curves = []
    for (layer, head), roles in picks.items():
        label = f"L{layer} h{head}: rank {int(ranks[layer, head])}"
        label += f" ({', '.join(roles)})" if roles else ""
        curves.append(figures.HeadCurve(label, ratios[layer, head]))
    return curves


def run_figures(label: str, a: Analysis, out: Path) -> list[tuple[Path, str]]:
    """The four per-run figures as (png, caption)."""
    stem = slug(label)
    tau = FIGURE_TAU
    ranks = {k: a.kinds[k].ranks[tau].numpy() for k in ("pre", "post")}
    ratios = {k: a.kinds[k].explained_variance_ratio.numpy() for k in ("pre", "post")}
    curves = {k: head_selection(ranks[k], ratios[k]) for k in ranks}
    title = f"{label}: {model_name(a)} on {a.corpus}, {a.tokens} tokens"
    made = [
        (figures.rank_heatmaps(ranks, a.head_dim, tau, title), f"{stem}-rank-heatmap.png",
         f"Rank@{tau:g} per layer (rows) and KV head (columns), pre- and post-RoPE, on one color scale (of head_dim = {a.head_dim})."),
        (figures.per_layer_ranks(ranks, a.head_dim, tau, title), f"{stem}-per-layer-rank.png",
         f"Mean rank@{tau:g} over KV heads per layer; the band spans the lowest to the highest head."),
        (figures.cumulative_curves(curves, tau, title), f"{stem}-cumulative-variance.png",
         "Cumulative explained variance against the number of components for the median head of the first, middle and last layers and for the lowest- and highest-rank heads."),
        (figures.eigen_spectra(curves, title), f"{stem}-eigen-spectrum.png",
         "Eigenvalue spectra of the same heads, as a fraction of each head's total variance (log scale)."),
    ]  # fmt: skip
    return [(figures.save_png(fig, out / name), caption) for fig, name, caption in made]


def corpus_transfer_parts(ct: CorpusTransfer, out: Path) -> tuple[list[str], list[Path]]:
    specs = list(r_specs(ct.head_dim))
    matrices = {kind: {s: ct.matrix(kind, s).numpy() for s in specs} for kind in ct.per_head}
    png = figures.save_png(
        figures.transfer_heatmaps(
            ct.labels,
            matrices,
            "Fraction of the column run's key variance captured by the row run's top-r basis",
        ),
        out / "transfer-corpora.png",
    )
    caption = "Across corpora: each cell is the mean over layers and KV heads of the fraction of the column run's variance inside the row run's top-r principal subspace. rank@0.9 uses the row run's own rank per head."
    headers = ["kind", "basis from", "keys of"] + [f"top {s}" for s in specs]
    rows = [
        [kind, a, b] + [f"{matrices[kind][s][i, j]:.3f}" for s in specs]
        for kind in matrices
        for i, a in enumerate(ct.labels)
        for j, b in enumerate(ct.labels)
    ]
    return [html.figure(png, caption), table(headers, rows, "transfer-corpora")], [png]


def sequence_transfer_parts(
    sequences: list[SequenceTransfer], out: Path
) -> tuple[list[str], list[Path]]:
    notes = [html.paragraph(n, "note") for s in sequences for n in s.notes]
    measured = [s for s in sequences if s.per_layer]
    if not measured:
        return notes, []
    specs = list(r_specs(measured[0].head_dim))
    names = {
        "halves": "first half → second half",
        "windows": "one window → other windows",
        "random": "random window-sized subset → rest",
    }
    rows, values = [], []
    for s in measured:
        for test, kinds in s.per_layer.items():
            for kind in kinds:
                rows.append(f"{s.label} · {names[test]} · {kind}")
                values.append([s.mean(test, kind, spec) for spec in specs])
    png = figures.save_png(
        figures.sequence_transfer_heatmap(
            rows, specs, np.array(values), "Transfer across sequences within a run"
        ),
        out / "transfer-sequences.png",
    )
    caption = "Across sequences: a basis fitted on some kept keys, evaluated on held-out keys of the same run (mean over layers and KV heads). The window test averages over fitting on each window in turn; the random-subset control fits on as many keys drawn from all windows, so the gap between the two is what changing windows costs beyond sample size."
    table_rows = [[r] + [f"{v:.3f}" for v in vals] for r, vals in zip(rows, values, strict=True)]
    return [
        html.figure(png, caption),
        table(
            ["run · test · kind"] + [f"top {s}" for s in specs], table_rows, "transfer-sequences"
        ),
    ] + notes, [png]


# ---- page -----------------------------------------------------------------------------------


def render(report: Report, out: Path) -> Path:
    """Write the PNGs and index.html into `out` (created if needed)."""
    prepare_out(out)
    sections, nav, pngs = [], [], []
    note = html.paragraph(
        "Rank@τ over all layers and KV heads: the smallest number of principal components that"
        " explains at least τ of a head's key variance. Percentages are of head_dim.",
        "note",
    )
    summary = [runs_table(report), note, summary_table(report)]
    sections.append(html.section("Summary", summary, "summary"))
    nav.append(("summary", "Summary"))
    for label, a in zip(report.labels, report.analyses, strict=True):
        made = run_figures(label, a, out)
        pngs += [p for p, _ in made]
        anchor = f"run-{slug(label)}"
        parts = [html.figure(p, c) for p, c in made] + [
            "<h3>Per head</h3>",
            per_head_table(label, a),
        ]
        sections.append(html.section(f"Run {label}", parts, anchor))
        nav.append((anchor, label))
    transfer_parts: list[str] = []
    if report.corpus_transfer is not None:
        parts, made_pngs = corpus_transfer_parts(report.corpus_transfer, out)
        transfer_parts += ["<h3>Across corpora</h3>"] + parts
        pngs += made_pngs
    parts, made_pngs = sequence_transfer_parts(report.sequence_transfer, out)
    transfer_parts += ["<h3>Across sequences</h3>"] + parts
    pngs += made_pngs
    sections.append(html.section("Calibration transfer", transfer_parts, "transfer"))
    nav.append(("transfer", "Transfer"))
    first = report.analyses[0]
    mode = "centered" if first.config.centered else "uncentered"
    subtitle = f"{model_name(first)} ({first.model_identity}) · head_dim {first.head_dim} · {first.num_layers} layers × {first.num_kv_heads} KV heads · {mode} PCA"
    index = out / "index.html"
    index.write_text(
        html.page(f"Key rank report: {', '.join(report.labels)}", subtitle, sections, nav),
        encoding="utf-8",
    )
    report.index, report.pngs = index, pngs
    return index
