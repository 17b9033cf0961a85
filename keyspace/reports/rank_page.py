"""The rank report's page: a Report's numbers as a headline, tables and figures, in html.page.

All numbers shown come from the Report's Analysis objects, the same ones `--json` prints.
"""

from __future__ import annotations

import numpy as np

from keyspace.analyze.pca import FP16_MAX, Analysis
from keyspace.analyze.transfer import CorpusTransfer, SequenceTransfer, r_specs
from keyspace.reports import figures, html, provenance
from keyspace.reports.rank_report import Report, slug
from keyspace.runfolder.manifest import Manifest
from keyspace.runfolder.store import DEFAULT_THRESHOLD, KINDS, RunFolder, ranks_path

FIGURE_TAU = DEFAULT_THRESHOLD
# The spectra of a run with queries, in the order the page shows them (keyspace.analyze.spectra).
SPECTRA = ("key", "query", "score")
TESTS = {
    "halves": "first half → second half",
    "windows": "one window → other windows",
    "random": "random window-sized subset → rest",
}
SHORT_TESTS = {"halves": "half → half", "windows": "window → rest", "random": "random → rest"}
SPECTRA_NOTE = (
    "Query and score spectra, for runs collected with queries: per KV head, S_q = E[q qᵀ] pools"
    " the queries of its group, and the score spectrum is the eigenvalues of S_q^½ C_k S_q^½"
    " (C_k the key covariance): rank@τ of the score spectrum is the number of query-aware"
    " coordinates that hold τ of the score energy E[(q·(k − μ))²], the dimensions a query-aware"
    " Loki needs. k̃ = A k are the keys in that basis; fp16 headroom is 65504 over the largest"
    " RMS of a k̃ coordinate (docs/analysis.md)."
)


def rank_facts(report: Report) -> list[html.Fact]:
    """Each run's corpus, tokens, window and collecting keyspace, its ranks file as a download,
    the model identity (short, full in the tooltip), then this rendering's date and command."""
    facts = []
    for label, a in zip(report.labels, report.analyses, strict=True):
        manifest = RunFolder.open(a.run).manifest
        doc = manifest.to_json() if hasattr(manifest, "to_json") else dict(manifest)
        ranks = ranks_path(a.run)
        link = (
            html.download(
                f"{label}-{ranks.name}", ranks.read_bytes(), "application/json", ranks.name
            )
            if ranks.is_file()
            else f"{ranks.name} not written (analyzed in memory)"
        )
        facts += provenance.run_facts(
            doc, a.run, "Calibration run" if len(report.labels) == 1 else f"Run {label}"
        )
        facts.append(html.Fact("Data", f"ranks, spectra and summaries of {label}", link=link))
    facts.append(provenance.identity_fact(report.analyses[0].model_identity))
    return facts + provenance.rendered_fact()


def short(identity: str, keep: int = 16) -> str:
    """A long content hash shortened for tables; the full identity is in the page subtitle."""
    return identity if len(identity) <= keep + 1 else identity[:keep] + "…"


def model_name(a: Analysis) -> str:
    return a.model_spec or short(a.model_identity)


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def spectra_of(a: Analysis, kind: str) -> dict:
    """spectrum -> its ranks and summaries (`.ranks[τ]` (layers, heads), `.summary[τ]`) for a run
    with queries: the keys' PCA, the queries' S_q, and the score spectrum."""
    ka = a.kinds[kind]
    return {"key": ka, "query": ka.query, "score": ka.score}


def with_queries(report: Report) -> bool:
    return all(a.has_queries for a in report.analyses)


# ---- first screen ---------------------------------------------------------------------------


def listed(report: Report, values: list[float], fmt: str) -> str:
    """One value, or each run's value with its label."""
    if len(values) == 1:
        return format(values[0], fmt)
    pairs = zip(values, report.labels, strict=True)
    return ", ".join(f"{format(v, fmt)} ({label})" for v, label in pairs)


def where(report: Report) -> str:
    first = report.analyses[0]
    text = f"{model_name(first)}, {first.num_layers} layers × {first.num_kv_heads} KV heads"
    if len(report.analyses) == 1:
        text += f", {first.tokens} tokens of {first.corpus}"
    return text


def spectra_headline(report: Report) -> str:
    """The finding for runs with queries: mean rank@0.9 of the key, query and score spectra."""
    tau = FIGURE_TAU

    def means(kind: str) -> list[str]:
        values = {
            s: [spectra_of(a, kind)[s].summary[tau].mean for a in report.analyses] for s in SPECTRA
        }
        return [listed(report, values[s], ".1f") for s in SPECTRA]

    post, pre = means("post"), means("pre")
    return (
        f"At τ = {tau:.0%}, post-RoPE heads need on average {post[0]} of"
        f" {report.analyses[0].head_dim} dimensions for the keys' variance, {post[1]} for the"
        f" queries' energy and {post[2]} for the score energy q·k; pre-RoPE {pre[0]}, {pre[1]}"
        f" and {pre[2]} ({where(report)})."
    )


def headline(report: Report) -> str:
    """The finding in one sentence: mean rank@0.9 over (layer, KV head) of post- and pre-RoPE
    keys, per run; for runs with queries the mean rank of each spectrum (`spectra_headline`).
    The mean, as in the validate report's headline."""
    if with_queries(report):
        return spectra_headline(report)
    tau = FIGURE_TAU
    first = report.analyses[0]
    means = {kind: [a.kinds[kind].summary[tau].mean for a in report.analyses] for kind in KINDS}
    return (
        f"Post-RoPE keys need a mean {listed(report, means['post'], '.1f')} of"
        f" {first.head_dim} dimensions to hold {tau:.0%} of their variance; pre-RoPE keys need"
        f" {listed(report, means['pre'], '.1f')} ({where(report)})."
    )


def run_windows(manifest: Manifest) -> int | None:
    """Windows the run's keys come from (older manifests only give tokens and window length)."""
    if manifest.num_windows is not None:
        return manifest.num_windows
    return -(-manifest.tokens // manifest.window) if manifest.tokens else None


def sample_warnings(report: Report) -> list[tuple[str, str]]:
    """Boxes under the headline: runs of one window, too few tokens, stale analyses."""
    boxes = []
    for label, a in zip(report.labels, report.analyses, strict=True):
        manifest = RunFolder.open(a.run).manifest
        windows = run_windows(manifest)
        if windows is not None and windows <= 1:
            boxes.append(
                (
                    "Small sample",
                    f"{label}: keys come from {html.plural(windows, 'window')} of"
                    f" {manifest.window} tokens; ranks may not hold for other text,"
                    " and transfer across windows cannot be measured. Collect more with --max-tokens.",
                )
            )
        boxes += [("Small sample", w) for w in a.warnings]
    return boxes + [("Stale analysis", note) for note in report.notes]


# ---- tables ---------------------------------------------------------------------------------


def runs_table(report: Report) -> str:
    headers = ["Run", "Model", "Identity", "Corpus", "Tokens", "Windows", "head_dim", "PCA"]
    headers.append("Kept keys")
    rows = []
    for label, a in zip(report.labels, report.analyses, strict=True):
        run = RunFolder.open(a.run)
        mode = "centered" if a.config.centered else "uncentered"
        kept = "yes" if run.has_kept_keys else "no"
        rows.append(
            [label, a.model_spec or "?", short(a.model_identity), a.corpus, a.tokens]
            + [run_windows(run.manifest) or "?", a.head_dim, mode, kept]
        )
    return html.table(headers, rows, "runs")


def summary_table(report: Report) -> str:
    """Per run and τ: mean/median/min–max rank, pre vs post, with % of head_dim."""
    headers = ["Run", "τ"] + [
        f"{kind} {stat}" for kind in KINDS for stat in ("mean", "median", "min–max")
    ]
    rows, row_attrs = [], []
    for label, a in zip(report.labels, report.analyses, strict=True):
        for tau in a.thresholds:
            row: list[object] = [label, f"{tau:g}"]
            for kind in KINDS:
                s = a.kinds[kind].summary[tau]
                row += [
                    f"{s.mean:.2f} ({pct(s.mean / s.head_dim)})",
                    f"{s.median:g} ({pct(s.median / s.head_dim)})",
                    f"{s.min}–{s.max}",
                ]
            rows.append(row)
            row_attrs.append({"data-run": label, "data-tau": repr(float(tau))})
    return html.table(headers, rows, "summary", row_attrs=row_attrs)


def spectra_table(report: Report) -> str:
    """Per run with queries, τ and kind: mean rank of the key, query and score spectra, and the
    largest RMS of a query-aware key coordinate with its fp16 headroom."""
    headers = ["Run", "τ", "kind"] + [f"{s} mean (min–max)" for s in SPECTRA]
    headers += ["max RMS of k̃", "fp16 headroom"]
    rows, row_attrs = [], []
    for label, a in zip(report.labels, report.analyses, strict=True):
        if not a.has_queries:
            continue
        for tau in a.thresholds:
            for kind in KINDS:
                row: list[object] = [label, f"{tau:g}", kind]
                for spectrum in spectra_of(a, kind).values():
                    s = spectrum.summary[tau]
                    row.append(f"{s.mean:.2f} ({pct(s.mean / s.head_dim)}) {s.min}–{s.max}")
                rms = float(a.kinds[kind].scores.key_rms.max())
                row += [f"{rms:.3g}", f"{FP16_MAX / rms:.3g}×" if rms > 0 else "–"]
                rows.append(row)
                row_attrs.append(
                    {"data-run": label, "data-tau": repr(float(tau)), "data-kind": kind}
                )
    return html.table(headers, rows, "spectra", row_attrs=row_attrs)


def per_head_table(label: str, a: Analysis) -> str:
    """One row per (layer, KV head): rank at every τ, pre and post, and the top component's share;
    for a run with queries also the query and score ranks."""
    taus = a.thresholds
    extra = ("query", "score") if a.has_queries else ()
    headers = (
        ["layer", "KV head"]
        + [f"{kind} rank@{t:g}" for kind in KINDS for t in taus]
        + [f"{kind} top-1 share" for kind in KINDS]
        + [f"{kind} {s} rank@{t:g}" for kind in KINDS for s in extra for t in taus]
    )
    rows = []
    for layer in range(a.num_layers):
        for head in range(a.num_kv_heads):
            row: list[object] = [layer, head]
            row += [int(a.kinds[kind].ranks[t][layer, head]) for kind in KINDS for t in taus]
            row += [
                pct(float(a.kinds[kind].explained_variance_ratio[layer, head, 0])) for kind in KINDS
            ]
            row += [
                int(spectra_of(a, kind)[s].ranks[t][layer, head])
                for kind in KINDS
                for s in extra
                for t in taus
            ]
            rows.append(row)
    return html.table(headers, rows, "per-head", {"data-run": label}, tall=True)


# ---- figures --------------------------------------------------------------------------------


def head_selection(ranks: dict[str, np.ndarray], ratios: dict[str, np.ndarray]):
    """Heads to draw, the same in every kind's panel: the median-rank head (by post-RoPE rank)
    of the first, middle and last layer, then each kind's lowest- and highest-rank head.

    ranks[kind]: (layers, heads) rank@0.9; ratios[kind]: (layers, heads, head_dim).
    """
    reference = ranks.get("post", next(iter(ranks.values())))
    layers, heads = reference.shape
    picks: dict[tuple[int, int], list[str]] = {}
    for layer in sorted({0, layers // 2, layers - 1}):
        head = int(np.argsort(reference[layer], kind="stable")[(heads - 1) // 2])
        picks.setdefault((layer, head), [])
    for kind, r in ranks.items():
        for role, flat in (("lowest", np.argmin(r)), ("highest", np.argmax(r))):
            layer, head = (int(i) for i in np.unravel_index(int(flat), r.shape))
            picks.setdefault((layer, head), []).append(f"{role} {kind}")
    curves = []
    for (layer, head), roles in picks.items():
        label = f"L{layer} h{head}: rank " + ", ".join(
            f"{kind} {int(ranks[kind][layer, head])}" for kind in ranks
        )
        label += f" ({', '.join(roles)})" if roles else ""
        curves.append(figures.HeadCurve(label, {k: ratios[k][layer, head] for k in ratios}))
    return curves


def rank_figures(stem: str, a: Analysis, title: str) -> list[tuple[html.Png, str]]:
    """The heatmap and per-layer figures: key ranks, or for a run with queries all three spectra."""
    tau = FIGURE_TAU
    if not a.has_queries:
        panels = {k: a.kinds[k].ranks[tau].numpy() for k in KINDS}
        per_layer = figures.per_layer_ranks(panels, a.head_dim, tau, title)
        what, which, each = "", "", ""
    else:
        spectra = {k: {s: r.ranks[tau].numpy() for s, r in spectra_of(a, k).items()} for k in KINDS}
        panels = {
            f"{figures.KIND_TITLES[k]}\n{figures.SPECTRUM_TITLES[s]}": spectra[k][s]
            for k in KINDS
            for s in SPECTRA
        }
        per_layer = figures.per_layer_spectra(spectra, a.head_dim, tau, title)
        what, each = " of three spectra", " for each spectrum"
        which = (
            ": the keys' variance (key PCA, what Loki keeps), the queries' energy (eigenvalues of"
            " S_q) and the score energy (eigenvalues of S_q^½ C_k S_q^½, what the query-aware basis"
            " keeps)"
        )
    heatmap = figures.rank_heatmaps(panels, a.head_dim, tau, title)
    return [
        (figures.to_png(heatmap, f"{stem}-rank-heatmap.png"),
         f"Rank@{tau:g} per layer (rows) and KV head (columns){what}, pre- and post-RoPE, on one colour scale from 0 to head_dim = {a.head_dim}{which}."),
        (figures.to_png(per_layer, f"{stem}-per-layer-rank.png"),
         f"Mean rank@{tau:g} over KV heads per layer{each}; the band spans the lowest to the highest head."),
    ]  # fmt: skip


def run_figures(label: str, a: Analysis) -> list[tuple[html.Png, str]]:
    """The four per-run figures as (png, caption)."""
    stem, tau = slug(label), FIGURE_TAU
    ranks = {k: a.kinds[k].ranks[tau].numpy() for k in KINDS}
    ratios = {k: a.kinds[k].explained_variance_ratio.numpy() for k in KINDS}
    curves = head_selection(ranks, ratios)
    title = f"{label}: {model_name(a)} on {a.corpus}, {a.tokens} tokens"
    return rank_figures(stem, a, title) + [
        (figures.to_png(figures.cumulative_curves(curves, tau, title), f"{stem}-cumulative-variance.png"),
         "Keys only: cumulative explained variance of the keys against the number of principal components, for the median head of the first, middle and last layers and for each kind's lowest- and highest-rank heads. A head has the same colour in both panels."),
        (figures.to_png(figures.eigen_spectra(curves, title), f"{stem}-eigen-spectrum.png"),
         "Keys only: eigenvalue spectra of the same heads' keys, as a fraction of each head's total key variance (log scale)."),
    ]  # fmt: skip


def corpus_transfer_parts(ct: CorpusTransfer) -> tuple[list[str], list[html.Png]]:
    specs = list(r_specs(ct.head_dim))
    matrices = {kind: {s: ct.matrix(kind, s).numpy() for s in specs} for kind in ct.per_head}
    png = figures.to_png(
        figures.transfer_heatmaps(
            ct.labels,
            matrices,
            "Fraction of the column run's key variance captured by the row run's top-r basis",
        ),
        "transfer-corpora.png",
    )
    caption = "Across corpora: each cell is the mean over layers and KV heads of the fraction of the column run's variance inside the row run's top-r principal subspace. rank@0.9 uses the row run's own rank per head."
    headers = ["kind", "basis from", "keys of"] + [f"top {s}" for s in specs]
    rows = [
        [kind, a, b] + [f"{matrices[kind][s][i, j]:.3f}" for s in specs]
        for kind in matrices
        for i, a in enumerate(ct.labels)
        for j, b in enumerate(ct.labels)
    ]
    return [html.figure(png, caption), html.table(headers, rows, "transfer-corpora")], [png]


def sequence_transfer_parts(sequences: list[SequenceTransfer]) -> tuple[list[str], list[html.Png]]:
    notes = [html.paragraph(n, "note") for s in sequences for n in s.notes]
    measured = [s for s in sequences if s.per_layer]
    if not measured:
        return notes, []
    specs = list(r_specs(measured[0].head_dim))
    keys = [
        (s, test, kind) for s in measured for test, kinds in s.per_layer.items() for kind in kinds
    ]
    values = np.array([[s.mean(test, kind, spec) for spec in specs] for s, test, kind in keys])
    several = len(sequences) > 1
    labels = [
        (f"{s.label} · " if several else "") + f"{SHORT_TESTS[test]} · {kind}"
        for s, test, kind in keys
    ]
    png = figures.to_png(
        figures.sequence_transfer_heatmap(
            labels, specs, values, "Transfer across sequences within a run"
        ),
        "transfer-sequences.png",
    )
    caption = "Across sequences: a basis fitted on some kept keys, evaluated on held-out keys of the same run (mean over layers and KV heads): first half → second half; one window → the other windows (window → rest); a random window-sized subset → the rest (random → rest). The window test averages over fitting on each window in turn; the random-subset control fits on as many keys drawn from all windows, so the gap between the two is what changing windows costs beyond sample size."
    rows = [
        [s.label, TESTS[test], kind] + [f"{v:.3f}" for v in vals]
        for (s, test, kind), vals in zip(keys, values, strict=True)
    ]
    headers = ["run", "test", "kind"] + [f"top {s}" for s in specs]
    return [html.figure(png, caption), html.table(headers, rows, "transfer-sequences")] + notes, [
        png
    ]


# ---- page -----------------------------------------------------------------------------------


def rank_page(report: Report, related: list[tuple[str, str]]) -> tuple[str, list[html.Png]]:
    """The page's HTML and the PNGs it embeds (the caller writes them beside it)."""
    sections, nav, pngs = [], [], []
    note = html.paragraph(
        "Rank@τ over all layers and KV heads: the smallest number of principal components that"
        " explains at least τ of a head's key variance. Percentages are of head_dim.",
        "note",
    )
    summary = [runs_table(report), note, summary_table(report)]
    if any(a.has_queries for a in report.analyses):
        summary += [html.paragraph(SPECTRA_NOTE, "note"), spectra_table(report)]
    sections.append(html.section("Summary", summary, "summary"))
    nav.append(("summary", "Summary"))
    for label, a in zip(report.labels, report.analyses, strict=True):
        made = run_figures(label, a)
        pngs += [png for png, _ in made]
        anchor = f"run-{slug(label)}"
        parts = [html.figure(png, caption) for png, caption in made]
        parts += ["<h3>Per head</h3>", per_head_table(label, a)]
        sections.append(html.section(f"Run {label}", parts, anchor))
        nav.append((anchor, label))
    transfer: list[str] = []
    if report.corpus_transfer is not None:
        parts, made_pngs = corpus_transfer_parts(report.corpus_transfer)
        transfer += ["<h3>Across corpora</h3>"] + parts
        pngs += made_pngs
    parts, made_pngs = sequence_transfer_parts(report.sequence_transfer)
    transfer += ["<h3>Across sequences</h3>"] + parts
    pngs += made_pngs
    sections.append(html.section("Calibration transfer", transfer, "transfer"))
    nav.append(("transfer", "Transfer"))
    first = report.analyses[0]
    mode = "centered" if first.config.centered else "uncentered"
    subtitle = f"{model_name(first)} · head_dim {first.head_dim} · {first.num_layers} layers × {first.num_kv_heads} KV heads · {mode} PCA"
    text = html.page(
        title=f"Key rank report: {', '.join(report.labels)}",
        subtitle=subtitle,
        headline=headline(report),
        warnings=sample_warnings(report),
        sections=sections,
        navigation=nav,
        related=related,
        facts=rank_facts(report),
        generator="keyspace rank-report",
    )
    return text, pngs
