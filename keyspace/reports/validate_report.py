"""The validate report: perplexity table, Pareto plot, recall vs rank@90. Data (validate.json) in, files out."""

from __future__ import annotations

import html
from pathlib import Path

PARETO_PNG = "validate_pareto.png"
RECALL_PNG = "validate_recall_vs_rank.png"
LAYER_PNG = "validate_recall_per_layer.png"
REPORT_HTML = "validate.html"
RECALLS = (
    ("topk_recall", "top-k recall"),
    ("mass_recall", "attention-mass recall"),
    ("relative_mass_recall", "mass recall / exact top-k mass"),
)


def _figure(width: float = 6.4, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row_label(row: dict) -> str:
    parts = [row["method"]]
    if row["d"]:
        parts.append(f"d={row['d']}")
    if row["k"]:
        parts.append(f"k={row['k']:g}")
    return " ".join(parts)


def measured_time_points(doc: dict) -> list[tuple[dict, float]]:
    """(perplexity row, Loki time / SDPA time) for Loki rows with a measured kernel timing at the
    longest benchmarked cache, group selection (one index set per KV head)."""
    measured = (doc.get("speed") or {}).get("measured") or []
    if not measured:
        return []
    longest = max(m["seq"] for m in measured)
    ratio = {
        (m["d"], m["k_frac"]): m["loki_ms"] / m["sdpa_ms"]
        for m in measured
        if m["seq"] == longest and m["select"] in ("group", "mha")
    }
    return [
        (r, ratio[(r["d"], r["k"])])
        for r in doc["results"]
        if r["method"] == "loki" and (r["d"], r["k"]) in ratio
    ]


def pareto_plot(doc: dict, path: Path) -> Path:
    """Perplexity against the share of KV bytes read (and, on a GPU, against measured decode time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = measured_time_points(doc)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4.6), squeeze=False)
    ax = axes[0, 0]
    methods = sorted({r["method"] for r in doc["results"]})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    markers = {None: "*", "window": "o", "row": "s"}
    for row in doc["results"]:
        point = (row["kv_bytes_fraction"], row["ppl"])
        ax.scatter(*point, color=colours[row["method"]], marker=markers[row["k_mode"]], s=40)
        if row["method"] in ("loki", "full"):  # label the method under test; colours say the rest
            ax.annotate(
                _row_label(row), point, fontsize=6, xytext=(3, 2), textcoords="offset points"
            )
    for method in methods:
        ax.scatter([], [], color=colours[method], label=method)
    for mode, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=f"k-mode {mode or 'n/a'}")
    ax.set_xlabel("share of dense KV bytes read per decode step (analytic)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title("Accuracy vs memory traffic")
    ax.legend(fontsize=7, ncol=2)
    if timed:
        ax = axes[0, 1]
        for row, ratio in timed:
            ax.scatter(
                ratio, row["ppl"], color=colours["loki"], marker=markers[row["k_mode"]], s=40
            )
            ax.annotate(
                _row_label(row),
                (ratio, row["ppl"]),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        ax.axvline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("measured Loki decode-step time / dense SDPA time (kernel benchmark)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_yscale("log")
        ax.set_title("Accuracy vs measured time (GPU)")
    return _save(plt, fig, path)


def recall_vs_rank_plot(doc: dict, path: Path) -> Path:
    """Top-k and attention-mass recall of each (layer, query head) against its rank@90, one colour per (d, k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), sharex=True)
    for ax, (field, title) in zip(
        axes,
        RECALLS,
        strict=True,
    ):
        for entry in doc["recall"]:
            if entry["rank"] is None:
                continue
            ranks = [r for row in entry["rank"] for r in row]
            values = [m for row in entry[field] for m in row]
            rho = entry[f"spearman_rank_vs_{field.removesuffix('_recall')}"]["rho"]
            rho_text = "n/a" if rho is None else f"{rho:+.2f}"
            ax.scatter(
                ranks,
                values,
                s=12,
                alpha=0.6,
                label=f"d={entry['d']} k={entry['k']:g} (Spearman ρ {rho_text})",
            )
        ax.set_xlabel(f"head's rank at 90% explained variance ({doc['rotary']}-RoPE keys)")
        ax.set_ylabel(f"{title} of Loki's selection")
        ax.set_title(f"{title} vs rank@90, per (layer, query head)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def recall_per_layer_plot(doc: dict, path: Path) -> Path:
    """Each recall per layer (mean over query heads), one line per (d, k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RECALLS), figsize=(16, 4.2), sharey=True)
    for ax, (field, title) in zip(axes, RECALLS, strict=True):
        for entry in doc["recall"]:
            ax.plot(
                entry["per_layer"][field],
                marker="o",
                ms=3,
                label=f"d={entry['d']} k={entry['k']:g}",
            )
        ax.set_xlabel("layer")
        ax.set_title(f"{title} per layer")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("mean over query heads")
    if doc["recall"]:
        axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def recall_rows(doc: dict) -> list[list[str]]:
    """Per (d, k): the mean of each recall and its Spearman ρ with rank@90."""

    def mean(table: list[list[float]]) -> float:
        return sum(map(sum, table)) / sum(map(len, table))

    def rho(entry: dict, field: str) -> str:
        stat = entry[f"spearman_rank_vs_{field.removesuffix('_recall')}"]
        return (
            "n/a" if not stat or stat["rho"] is None else f"{stat['rho']:+.2f} (p={stat['p']:.1g})"
        )

    return [
        [e["d"], f"{e['k']:g}", e["k_mode"], e["rows"]]
        + [f"{mean(e[field]):.3f} / {rho(e, field)}" for field, _ in RECALLS]
        for e in doc["recall"]
    ]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def perplexity_rows(doc: dict) -> list[list[str]]:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    return [
        [
            r["method"],
            r["d"] or "-",
            fmt(r["k"], "g"),
            r["k_mode"] or "-",
            f"{r['ppl']:.3f}",
            f"{r['kv_bytes_fraction']:.3f}",
            r["tokens"],
        ]
        for r in sorted(doc["results"], key=lambda r: (r["k_mode"] or "", r["k"] or 1.0, r["ppl"]))
    ]


def _extras(doc: dict) -> str:
    parts = []
    if doc["decode"]:
        rows = [
            [
                e["method"],
                e["d"],
                e["k"],
                e["prompts"],
                e["tokens"],
                f"{e['token_agreement']:.3f}",
                f"{e['nll_sparse']:.3f}",
                f"{e['nll_dense']:.3f}",
            ]
            for e in doc["decode"]
        ]
        parts.append(
            "<h2>Real decoding (LokiCache)</h2>"
            + _table(
                [
                    "method",
                    "d",
                    "k",
                    "prompts",
                    "tokens",
                    "token agreement",
                    "NLL sparse",
                    "NLL dense",
                ],
                rows,
            )
        )
    timing = (doc.get("speed") or {}).get("measured") or []
    if timing:
        rows = [
            [
                m["seq"],
                m["d"],
                f"{m['k_frac']:g}",
                m["select"],
                f"{m['sdpa_ms']:.3f}",
                f"{m['loki_ms']:.3f}",
                f"{m['speedup']:.2f}x",
                f"{m['floor_speedup']:.2f}x",
            ]
            for m in timing
        ]
        headers = [
            "cache S",
            "d",
            "k",
            "selection",
            "SDPA ms",
            "Loki ms",
            "speedup",
            "byte-floor speedup",
        ]
        parts.append("<h2>Measured decode-step time (batch 16, fp16)</h2>" + _table(headers, rows))
    if doc["passkey"]:
        rows = [[e["method"], e["length"], f"{e['correct']}/{e['count']}"] for e in doc["passkey"]]
        parts.append("<h2>Passkey retrieval</h2>" + _table(["method", "length", "correct"], rows))
    return "".join(parts)


TEMPLATE = """<!doctype html><html><head><meta charset="utf-8"><title>keyspace validate</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>Loki validation: {model}</h1>
<p>Evaluated on {dataset} ({split}), {windows} windows of {window} tokens; {rotary}-RoPE PCA basis; k-modes: {k_modes}.</p>
<h2>Perplexity at an equal token budget</h2>{table}
<h2>Pareto: perplexity vs KV bytes read</h2><img src="{pareto}">
<h2>Dimensionality → accuracy</h2>
<p>Mean over (layer, query head) / Spearman ρ with the head's rank@90, rows whose budget is below their context.</p>
{recall_table}<img src="{recall}"><img src="{layers}">
{extras}
</body></html>
"""


def write_validate_report(doc: dict, out: str | Path) -> list[Path]:
    """Write the PNGs and validate.html into `out`; return their paths."""
    out = Path(out)
    pngs = [
        pareto_plot(doc, out / PARETO_PNG),
        recall_vs_rank_plot(doc, out / RECALL_PNG),
        recall_per_layer_plot(doc, out / LAYER_PNG),
    ]
    page = TEMPLATE.format(
        model=html.escape(doc["model"]["spec"]),
        dataset=html.escape(doc["dataset"]["spec"]),
        split=html.escape(doc["dataset"]["split"]),
        windows=doc["dataset"]["windows"],
        window=doc["dataset"]["window"],
        rotary=doc["rotary"],
        k_modes=", ".join(doc["k_modes"]),
        table=_table(
            ["method", "d", "k", "k-mode", "perplexity", "KV bytes", "tokens"], perplexity_rows(doc)
        ),
        pareto=PARETO_PNG,
        recall=RECALL_PNG,
        layers=LAYER_PNG,
        extras=_extras(doc),
        recall_table=_table(
            ["d", "k", "k-mode", "rows", *(title for _, title in RECALLS)], recall_rows(doc)
        ),
    )
    (out / REPORT_HTML).write_text(page)
    return [out / REPORT_HTML, *pngs]
