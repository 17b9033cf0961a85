"""The validate report's tables and number formats: validate.json records in, HTML tables out.

Fields newer than a document (forced_agreement, relative mass recall, the % of byte floor)
show as n/a, and so does a number the run could not measure (a diverged method's perplexity: null
in validate.json, NaN or infinity in memory).
"""

from __future__ import annotations

import math

from keyspace.reports import html
from keyspace.reports.validate_figures import fraction_label, keep_label, task_method


def fmt_d(row: dict) -> str:
    """'32', or 'auto:0.9 (mean 40.0)' for per-head ranks; '-' when the method has no d."""
    d = row.get("d")
    if d is None:
        return "-"
    mean = row.get("d_mean")
    return f"{d} (mean {mean:.1f})" if str(d).startswith("auto") and mean else str(d)


def fmt_k(k: float | dict | None) -> str:
    """A fraction as '1/8'; a row (dict) as its budget: '1/8', '2048 tok' or '-'."""
    if isinstance(k, dict):
        return keep_label(k) or "-"
    return "-" if k is None else fraction_label(k)


def setting(row: dict) -> str:
    """'d=32, k=1/8' (with the mean d of an auto setting), leaving out what the method lacks;
    a basis other than the paper's key basis is named."""
    parts = [f"d={fmt_d(row)}"] if row.get("d") is not None else []
    parts += [f"k={fmt_k(row)}"] if keep_label(row) is not None else []
    parts += [f"{row['basis']} basis"] if row.get("basis") not in (None, "key") else []
    return ", ".join(parts) or "its only setting"


def shows_basis(doc: dict) -> bool:
    """Tables get a basis column when the run compared more than one basis."""
    return len(doc.get("basis") or []) > 1


def basis_cells(doc: dict, row: dict) -> list[str]:
    return [row.get("basis") or "-"] if shows_basis(doc) else []


def basis_headers(doc: dict) -> list[str]:
    return ["basis"] if shows_basis(doc) else []


def measured(value: object) -> float | None:
    """A finite number, else None: validate.json writes a diverged method's NaN or infinity as
    null."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def measured_rows(rows: list[dict]) -> list[dict]:
    """The perplexity rows with a finite perplexity and KV-bytes share: the ones a figure or a
    headline can place; the table shows the others as n/a."""
    return [r for r in rows if None not in (measured(r["ppl"]), measured(r["kv_bytes_fraction"]))]


def change(value: float | None, reference: float) -> str:
    if measured(value) is None:
        return "n/a"
    return f"{100 * (value / reference - 1):+.1f}%"


def on_gpu(doc: dict) -> bool:
    """The byte-floor speed-up (1 / KV-bytes share) is a GPU memory-bandwidth bound: shown for
    runs on CUDA, where the speed section measures against it, hidden on CPU runs."""
    return str(doc.get("device") or "").startswith("cuda")


def dense_ppl(doc: dict) -> float | None:
    return next((r["ppl"] for r in measured_rows(doc["results"]) if r["method"] == "full"), None)


def perplexity_table(doc: dict) -> str:
    """Dense first, then grouped by k-mode and k (equal budgets together), best first; the
    change against dense when the run measured dense."""
    modes = list(doc.get("k_modes") or [])
    dense = dense_ppl(doc)

    def order(r: dict):
        mode = modes.index(r["k_mode"]) if r["k_mode"] in modes else len(modes)
        # fractions first, then token budgets, each ascending
        ppl = measured(r["ppl"])
        return (
            r["method"] != "full",
            mode,
            r.get("k_budget") or 0,
            r["k"] or 1.0,
            math.inf if ppl is None else ppl,
        )

    rows, attrs, group = [], [], None
    for r in sorted(doc["results"], key=order):
        ppl, bytes_read = measured(r["ppl"]), measured(r["kv_bytes_fraction"])
        rows.append(
            [r["method"], *basis_cells(doc, r), fmt_d(r), fmt_k(r), r["k_mode"] or "-"]
            + ["n/a" if ppl is None else f"{ppl:.3f}"]
            + ([change(ppl, dense)] if dense else [])
            + ["n/a" if bytes_read is None else f"{100 * bytes_read:.1f}%"]
            + ([("n/a" if not bytes_read else f"{1 / bytes_read:.2f}×")] if on_gpu(doc) else [])
            + [r["tokens"]]
        )
        css = [{"loki": "ours", "full": "baseline"}.get(r["method"], "")]
        if group is not None and order(r)[:4] != group:
            css.append("group")  # a new (k-mode, k) budget starts: a rule above the row
        group = order(r)[:4]
        attrs.append({"class": " ".join(c for c in css if c), "data-method": r["method"]})
    headers = ["method", *basis_headers(doc), "d", "k", "k-mode", "perplexity"]
    headers += ["vs dense"] * bool(dense)
    headers += ["KV bytes read (% of dense)"]
    headers += ["byte-floor speed-up"] * on_gpu(doc) + ["tokens"]
    return html.table(headers, rows, "perplexity", row_attrs=attrs)


def decode_table(doc: dict) -> str:
    """The agreements and NLLs first, so a narrow screen shows them before it must scroll."""

    def share(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    headers = ["method", *basis_headers(doc), "d", "k", "k-mode", "teacher-forced agreement"]
    headers += ["free-running agreement"]
    headers += ["NLL Loki", "NLL dense", "selection", "prompts", "prompt tokens", "new tokens"]
    rows = [
        [e["method"], *basis_cells(doc, e), fmt_d(e), fmt_k(e), e.get("k_mode") or "-"]
        + [share(e.get("forced_agreement")), share(e["token_agreement"])]
        + [f"{e['nll_sparse']:.3f}", f"{e['nll_dense']:.3f}", e.get("gqa_select") or "-"]
        + [e["prompts"], e.get("prompt_tokens", "n/a"), e["tokens"]]
        for e in doc["decode"]
    ]
    return html.table(headers, rows, "decode")


def timing_table(measured: list[dict]) -> str:
    headers = ["cache S", "d", "k", "selection", "SDPA ms", "Loki ms", "speed-up"]
    headers += ["byte-floor speed-up", "Loki % of byte floor"]
    rows = [
        [m["seq"], m["d"], fmt_k({"k": m["k_frac"], "k_budget": m.get("k_budget")})]
        + [m["select"], f"{m['sdpa_ms']:.3f}"]
        + [f"{m['loki_ms']:.3f}", f"{m['speedup']:.2f}×", f"{m['floor_speedup']:.2f}×"]
        + [f"{m['loki_pct_floor']:.0f}%" if "loki_pct_floor" in m else "n/a"]
        for m in measured
    ]
    return html.table(headers, rows, "timing")


def decode_speed_table(decode: list[dict]) -> str:
    """The model's own decode loop: dense and Loki tokens/s per (d, k)."""
    headers = ["d", "k", "selection", "batch", "prompt S", "dense ms/step", "Loki ms/step"]
    headers += ["dense tokens/s", "Loki tokens/s", "speed-up"]
    rows = [
        [m["d"], fmt_k(m), m["gqa_select"], m["batch"], m["seq"]]
        + [f"{m['dense_step_ms']:.2f}", f"{m['loki_step_ms']:.2f}"]
        + [
            f"{m['dense_tokens_per_s']:.0f}",
            f"{m['loki_tokens_per_s']:.0f}",
            f"{m['speedup']:.2f}×",
        ]
        for m in decode
    ]
    return html.table(headers, rows, "timing")


def passkey_table(doc: dict) -> str:
    rows = [
        [e["method"], fmt_d(e), fmt_k(e), e["length"], f"{e['correct']}/{e['count']}"]
        for e in doc["passkey"]
    ]
    return html.table(["method", "d", "k", "context length", "correct"], rows, "passkey")


def interval(row: dict) -> str:
    """'0.80 [0.49, 0.94]': a task row's accuracy with its 95% interval."""
    return f"{row['accuracy']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def tasks_table(doc: dict) -> str:
    """Per (task, length), every method's accuracy with its 95% interval and its change against
    dense with a paired 95% interval (same prompts), in the rows' order (dense first)."""
    dense = {(r["task"], r["length"]): r["accuracy"] for r in doc["tasks"] if r["method"] == "full"}
    headers = ["task", "length", "method", "d", "k", "scoring", "accuracy", "95% interval"]
    headers += ["vs dense [paired 95%]", "prompts"]
    rows, attrs, group = [], [], None
    for r in doc["tasks"]:
        reference = dense.get((r["task"], r["length"]))
        versus = f"{r['accuracy'] - reference:+.2f}" if reference is not None else "-"
        if "vs_full" in r:  # validate.json before the paired differences has the point only
            versus = f"{r['vs_full']:+.2f} [{r['vs_full_low']:+.2f}, {r['vs_full_high']:+.2f}]"
        rows.append(
            [r["task"], r["length"], task_method(r), fmt_d(r), fmt_k(r), r.get("scoring", "-")]
            + [f"{r['accuracy']:.2f}", f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"]
            + ["-" if r["method"] == "full" else versus, r["count"]]
        )
        css = [{"loki": "ours", "full": "baseline"}.get(r["method"], "")]
        if group is not None and (r["task"], r["length"]) != group:
            css.append("group")
        group = (r["task"], r["length"])
        attrs.append({"class": " ".join(c for c in css if c), "data-method": r["method"]})
    return html.table(headers, rows, "tasks", row_attrs=attrs)
