"""The validate report: validate.json in, validate.html and its PNGs out, through html.page.

The page reads only the document: every number is validate.json's, formatted. Older documents
without a field (forced_agreement, relative mass recall, measured speed, tasks) render
without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from keyspace.errors import KeyspaceError
from keyspace.reports import figures, html, links, provenance
from keyspace.reports import validate_figures as vf
from keyspace.reports.validate_recall import recall_section
from keyspace.reports.validate_tables import (
    change,
    decode_speed_table,
    decode_table,
    dense_ppl,
    interval,
    measured_rows,
    passkey_table,
    perplexity_table,
    setting,
    tasks_table,
    timing_table,
)
from keyspace.runfolder.files import dumps_json, read_regular, write_text_atomic
from keyspace.runfolder.store import RunFolder

REPORT_HTML = links.VALIDATE_PAGE
# At or below these counts a measurement is anecdotal, and the page says so.
SMALL_WINDOWS = 1
SMALL_PROMPTS = 2


def dataset_name(doc: dict) -> str:
    spec = str(doc["dataset"]["spec"])
    name = "/".join(Path(spec).parts[-2:]) if "/" in spec else spec
    split = doc["dataset"].get("split")
    return f"{name} ({split})" if split and split not in name else name


# ---- first screen ---------------------------------------------------------------------------


def rank_clause(doc: dict) -> str:
    """'Post-RoPE keys need a mean 40.5 of 64 dims for 90% of their variance. ' The mean over
    KV heads, the statistic the rank report's headline uses too (each query head repeats its KV
    head's rank, so the mean over query heads is the same number)."""
    entry = next((e for e in doc["recall"] if e.get("rank")), None)
    if entry is None:
        return ""
    ranks = [r for row in entry["rank"] for r in row]
    tau = entry.get("rank_threshold", 0.9)
    kind = str(entry.get("rank_kind", doc["rotary"])).capitalize()
    return (
        f"{kind}-RoPE keys need a mean {mean(ranks):.1f} of {doc['head_dim']} dimensions"
        f" for {tau:.0%} of their variance. "
    )


def basis_of(row: dict) -> str:
    """A row's basis; rows older than the query-aware basis are in the paper's key basis."""
    return row.get("basis") or "key"


def basis_name(basis: str) -> str:
    return "the paper's key basis" if basis == "key" else f"the {basis} basis"


# Loki with its fixed first d coordinates (the paper) and with r = d chosen per step (--select):
# the headline weighs them together, naming the adaptive rows.
LOKI_FAMILY = ("loki", "loki-adaptive")


def bare_setting(row: dict) -> str:
    """'d=32, k=1/8' without the basis: the sentence names it already; a loki-adaptive row
    says so: 'd=32, k=1/8 (loki-adaptive)'."""
    text = setting({**row, "basis": None})
    return text + (f" ({row['method']})" if row.get("method") == "loki-adaptive" else "")


def loki_rows(doc: dict) -> list[dict]:
    """The Loki family's perplexity rows (loki, loki-adaptive) of the first k-mode (the one the
    page leads with)."""
    rows = [r for r in measured_rows(doc["results"]) if r["method"] in LOKI_FAMILY]
    mode = (doc.get("k_modes") or [None])[0]
    return [r for r in rows if r["k_mode"] == mode] or rows


def ppl_at(row: dict, dense: float | None, first: bool) -> str:
    """'11.50 vs 10.96 dense (+4.9%) at d=32, k=1/8, reading 38% of the KV bytes'."""
    versus = f" vs {dense:.2f} dense" if dense and first else ""
    versus += f" ({change(row['ppl'], dense)})" if dense else ""
    share = f"{100 * row['kv_bytes_fraction']:.0f}%" + (" of the KV bytes" if first else "")
    return f"{row['ppl']:.2f}{versus} at {bare_setting(row)}, reading {share}"


def loki_clause(doc: dict) -> str:
    """Loki's perplexity in the paper's key basis (its cheapest and its best setting), then the
    best setting of any basis when that is another basis. Every number names its basis."""
    rows, dense = loki_rows(doc), dense_ppl(doc)
    if not rows:
        sparse = sorted(
            (r for r in measured_rows(doc["results"]) if r["method"] != "full"),
            key=lambda r: r["ppl"],
        )
        if not sparse:
            return f"Dense perplexity is {dense:.2f}" if dense else "No perplexity was measured"
        return f"No Loki setting was measured; {sparse[0]['method']}'s perplexity is " + ppl_at(
            sparse[0], dense, True
        )
    best = min(rows, key=lambda r: r["ppl"])
    key = [r for r in rows if basis_of(r) == "key"]
    lead = key or [r for r in rows if basis_of(r) == basis_of(best)]
    cheapest = min(lead, key=lambda r: (r["kv_bytes_fraction"], r["ppl"]))
    lead_best = min(lead, key=lambda r: r["ppl"])
    absent = "" if key else " (no key-basis row was measured)"
    text = f"Loki in {basis_name(basis_of(lead[0]))}{absent}: perplexity {ppl_at(cheapest, dense, True)}"
    if lead_best is not cheapest:
        text += f", and {ppl_at(lead_best, dense, False)}"
    if basis_of(best) != basis_of(lead[0]):
        text += (
            f"; its best setting is in {basis_name(basis_of(best))}: {ppl_at(best, dense, False)}"
        )
    return text


def tasks_clause(doc: dict) -> str:
    """Per basis, where Loki loses most accuracy against dense on the long-context tasks ('' when
    no task ran): one clause per basis, so no number stands next to another basis's name."""
    rows = doc.get("tasks") or []
    dense = {(r["task"], r["length"]): r for r in rows if r["method"] == "full"}
    loki = [r for r in rows if r["method"] in LOKI_FAMILY and (r["task"], r["length"]) in dense]
    parts = []
    for basis in dict.fromkeys(basis_of(r) for r in loki):
        pairs = [(dense[(r["task"], r["length"])], r) for r in loki if basis_of(r) == basis]
        full, worst = max(pairs, key=lambda pair: pair[0]["accuracy"] - pair[1]["accuracy"])
        if worst["accuracy"] >= full["accuracy"]:
            parts.append(
                f"in {basis_name(basis)} Loki is never below dense ({len(pairs)} task × length ×"
                f" setting cells, {worst['count']} prompts each)"
            )
        else:
            parts.append(
                f"in {basis_name(basis)} Loki loses most on {worst['task']} at {worst['length']}"
                f" tokens: {interval(worst)} at {bare_setting(worst)} vs {interval(full)} dense"
            )
    return ("On the long-context tasks, " + "; ".join(parts) + ".") if parts else ""


def headline(doc: dict) -> str:
    """The finding in a few sentences with numbers, each built from `doc`'s rows."""
    data = doc["dataset"]
    text = rank_clause(doc) + loki_clause(doc)
    text += f" ({html.plural(data['windows'], 'window')} of {data['window']} tokens"
    text += f" of {dataset_name(doc)}"
    if len(doc.get("k_modes") or []) > 1:
        text += f", k chosen per {doc['k_modes'][0]}"
    text += ")"
    if dense_ppl(doc) is None:
        text += "; this run measured no dense baseline"
    tasks = tasks_clause(doc)
    return text + "." + (f" {tasks}" if tasks else "")


def sample_warnings(doc: dict) -> list[tuple[str, str]]:
    """A box under the headline when a measurement rests on one window or on ≤ 2 prompts."""
    notes = []
    data = doc["dataset"]
    if data["windows"] <= SMALL_WINDOWS:
        notes.append(
            f"Perplexities come from {html.plural(data['windows'], 'window')} of {data['window']}"
            " tokens, so differences of a few percent between methods can be noise; evaluate"
            " more text with a larger --max-tokens."
        )
    prompts = [e["prompts"] for e in doc["decode"]]
    if prompts and min(prompts) <= SMALL_PROMPTS:
        notes.append(
            f"The decoding check used {html.plural(min(prompts), 'prompt')}; its agreement"
            " numbers are anecdotal."
        )
    trials = [e["count"] for e in doc["passkey"]]
    if trials and min(trials) <= SMALL_PROMPTS:
        notes.append(f"Passkey retrieval used {html.plural(min(trials), 'prompt')} per length.")
    return [("Small sample", " ".join(notes))] if notes else []


# ---- sections -------------------------------------------------------------------------------


def measured_time_points(doc: dict) -> list[tuple[dict, float]]:
    """(perplexity row, Loki time / dense time) for Loki rows of the first k-mode. The model's own
    decode loop (speed.decode) when measured, else the kernel timing at the longest benchmarked
    cache with group selection (speed.measured)."""
    speed = doc.get("speed") or {}
    if speed.get("decode"):
        ratio = {
            (str(m["d"]), m["k"], m.get("k_budget")): m["loki_step_ms"] / m["dense_step_ms"]
            for m in speed["decode"]
        }
    elif speed.get("measured"):
        longest = max(m["seq"] for m in speed["measured"])
        ratio = {
            (str(m["d"]), None if m.get("k_budget") else m["k_frac"], m.get("k_budget")): m[
                "loki_ms"
            ]
            / m["sdpa_ms"]
            for m in speed["measured"]
            if m["seq"] == longest and m["select"] in ("group", "mha")
        }
    else:
        return []
    mode = (doc.get("k_modes") or [None])[0]
    key = lambda r: (str(r["d"]), r["k"], r.get("k_budget"))  # noqa: E731
    return [
        (r, ratio[key(r)])
        for r in measured_rows(doc["results"])
        if r["method"] == "loki" and r["k_mode"] == mode and key(r) in ratio
    ]


def perplexity_section(doc: dict) -> tuple[str, list[html.Png]]:
    rows = measured_rows(doc["results"])  # a diverged row (null perplexity) has no place on it
    modes = vf.pareto_modes(rows, list(doc.get("k_modes") or []))
    if not rows:
        pngs = []
    elif len(modes) == 1:
        pngs = [figures.to_png(vf.pareto(rows, modes[0]), "validate_pareto.png")]
    else:  # one panel per k-mode: side by side on a wide screen, stacked on a narrow one
        pngs = [
            figures.to_png(vf.pareto(rows, mode, width=5.4), f"validate_pareto-{mode}.png")
            for mode in modes
        ]
    caption = (
        "Perplexity against the share of dense KV bytes each method reads per decode step. Dotted"
        " line: dense. Where settings come within 8% of dense the axis breaks: the lower panel"
        " holds them, the upper one the rest. Loki's key basis is filled, its query-aware basis"
        " hollow. Points that share a byte share are spread slightly sideways; points far above"
        " dense sit on the top edge, named in the title with their value."
    )
    note = (
        "KV bytes: the share of dense KV-cache bytes one decode step reads, (d + 2·k·D) / (2·D)"
        " for Loki. Byte-floor speed-up: 1 / that share, the attention speed-up if decoding ran"
        " at full memory bandwidth (shown for GPU runs)."
    )
    parts = [html.paragraph(note, "note"), perplexity_table(doc)]
    parts += [html.figure(pngs, caption, wide=True)] if pngs else []
    return html.section("Perplexity at an equal token budget", parts, "perplexity"), pngs


def speed_section(doc: dict) -> tuple[str, list[html.Png]]:
    speed = doc.get("speed") or {}
    decode, measured = speed.get("decode") or [], speed.get("measured") or []
    parts = []
    if decode:
        parts += [
            html.paragraph(
                f"This model's own decode loop on {doc['device']} ({doc['dtype']}): a static cache,"
                " each step replayed from a CUDA graph, dense SDPA against Loki on the run's"
                " calibrated basis, after a random prompt. Median step over the timed steps.",
                "note",
            ),
            decode_speed_table(decode),
        ]
    if measured:
        m = measured[0]
        shape = f"batch {m['batch']}, {m['q_heads']} query / {m['kv_heads']} KV heads, head_dim {m['head_dim']}, {m['dtype']}"
        parts += [
            html.paragraph(
                f"Kernel benchmark of one decode step's attention on {doc['device']}: {shape}. Dense SDPA and Loki read the same cache; the byte floor is the speed-up if both ran at full memory bandwidth.",
                "note",
            ),
            timing_table(measured),
        ]
    pngs = []
    points = measured_time_points(doc)
    if points:
        png = figures.to_png(vf.measured_pareto(points, dense_ppl(doc)), "validate_pareto_time.png")
        pngs.append(png)
        source = (
            f"the model's decode step at a {decode[0]['seq']}-token prompt"
            if decode
            else f"the kernels' attention step at the longest cache ({max(x['seq'] for x in measured)}), group selection"
        )
        parts.append(
            html.figure(
                png, f"Perplexity against measured decode time relative to dense: {source}."
            )
        )
    return html.section("Measured decode speed", parts, "speed"), pngs


def tasks_section(doc: dict) -> tuple[str, list[html.Png]]:
    setup = doc.get("task_setup") or {}
    source = f"{setup['haystack']} haystack, seed {setup['seed']}, " if setup else ""
    note = html.paragraph(
        "RULER-style tasks generated offline to an exact length (prompt plus answer; docs/validate.md"
        " describes each). Dense and Loki decode for real, through the dense cache and LokiCache;"
        " the other methods prefill densely, then keep ceil(k·context) keys at each decode step"
        " in masked mode. Accuracy is exact match with a Wilson 95% interval, or the recall of"
        f" the asked values with a bootstrap interval ({source}greedy decoding).",
        "note",
    )
    png = figures.to_png(vf.task_heatmap(doc["tasks"]), "validate_tasks.png")
    caption = (
        "Accuracy per method and task, one panel per prompt length: exact-match tasks and"
        " recall-scored tasks on separate colour bars; the table below gives the intervals."
    )
    parts = [note, html.figure(png, caption, wide=True), tasks_table(doc)]
    return html.section("Long-context tasks", parts, "tasks"), [png]


def validate_page(
    doc: dict, related: list[tuple[str, str]], calibration: dict | None = None
) -> tuple[str, list[html.Png]]:
    """The page's HTML and the PNGs it embeds (the caller writes them beside it). calibration:
    the calibration run's manifest, when its folder could be read."""
    sections, nav, pngs = [], [], []

    def add(anchor: str, label: str, made: tuple[str, list[html.Png]]) -> None:
        sections.append(made[0])
        pngs.extend(made[1])
        nav.append((anchor, label))

    add("perplexity", "Perplexity", perplexity_section(doc))
    if doc["recall"]:
        add("recall", "Recall", recall_section(doc))
    if doc["decode"]:
        note = html.paragraph(
            "Greedy decoding with LokiCache against the dense cache. Free-running agreement: share"
            " of generated tokens equal to dense (after a first difference the texts drift apart)."
            " Teacher-forced agreement: share of steps with the same argmax when both are fed the"
            " dense continuation. NLL: mean negative log-likelihood of the dense continuation.",
            "note",
        )
        add(
            "decode",
            "Decoding",
            (html.section("Real decoding (LokiCache)", [note, decode_table(doc)], "decode"), []),
        )
    if (doc.get("speed") or {}).get("measured") or (doc.get("speed") or {}).get("decode"):
        add("speed", "Speed", speed_section(doc))
    if doc["passkey"]:
        add(
            "passkey",
            "Passkey",
            (html.section("Passkey retrieval", [passkey_table(doc)], "passkey"), []),
        )
    if doc.get("tasks"):
        add("tasks", "Tasks", tasks_section(doc))
    data = doc["dataset"]
    window = doc.get("calibration_window")
    calibrated = f" (calibrated on {window}-token windows)" if window else ""
    subtitle = (
        f"{doc['model']['spec']} · {doc['rotary']}-RoPE"
        f" {' and '.join(doc.get('basis') or ['key'])} basis{calibrated}"
        f" · {dataset_name(doc)}, {html.plural(data['windows'], 'window')} of {data['window']}"
        f" tokens · {doc.get('device') or 'device not recorded'}"
    )
    as_json = dumps_json(doc, indent=1).encode("utf-8")  # a NaN as null, as in validate.json
    facts = provenance.validate_facts(doc, calibration)
    facts.insert(0, html.Fact("Data", "every number on this page is validate.json's",
                              link=html.download("validate.json", as_json, "application/json", "validate.json")))  # fmt: skip
    text = html.page(
        title=f"Loki validation: {doc['model']['spec']}",
        subtitle=subtitle,
        headline=headline(doc),
        warnings=sample_warnings(doc),
        facts=facts,
        sections=sections,
        navigation=nav,
        related=related,
        generator="keyspace validate",
    )
    return text, pngs


def write_validate_report(doc: dict, out: str | Path) -> list[Path]:
    """Write validate.html and the PNGs it embeds into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text, pngs = validate_page(doc, links.validate_page_links(out), calibration_manifest(doc))
    paths = [png.write(out) for png in pngs]
    write_text_atomic(out / REPORT_HTML, text)
    return [out / REPORT_HTML, *paths]


def calibration_manifest(doc: dict) -> dict | None:
    """The manifest of the run validate.json names, when that folder is here and reads cleanly;
    None for a document whose run is elsewhere (results/ files come from other machines)."""
    run = doc.get("run")
    if not run:
        return None
    try:
        manifest = RunFolder.open(run).manifest
    except (KeyspaceError, OSError):
        return None
    return manifest.to_json() if hasattr(manifest, "to_json") else dict(manifest)


def load_validate_doc(path: str | Path) -> dict:
    """A validate.json, any version; one KeyspaceError for a file that is not one."""
    path = Path(path)
    try:
        doc = json.loads(read_regular(path, follow_links=True).decode("utf-8"))  # no FIFO
    except FileNotFoundError:
        raise KeyspaceError(
            f"{path} does not exist.", "Pass a validate.json written by `keyspace validate`."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise KeyspaceError(
            f"{path} cannot be read as JSON ({err}).",
            "Pass a validate.json written by `keyspace validate`.",
        ) from None
    needed = {"results", "model", "dataset"}
    if not isinstance(doc, dict) or not needed <= doc.keys():
        held = ", ".join(sorted(doc)[:6]) if isinstance(doc, dict) else type(doc).__name__
        raise KeyspaceError(
            f"{path} is not a validate.json: it has no {', '.join(sorted(needed - set(doc) if isinstance(doc, dict) else needed))} (it holds {held}).",
            "Benchmark and end-to-end records (bench-*, e2e-*) have no page; pass a file"
            " written by `keyspace validate`.",
        )
    return doc
