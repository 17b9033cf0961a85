"""The validate report: one self-contained page whose headline and tables hold validate.json's
numbers, a small-sample warning only when the sample is small, and the cross-link to a rank
report only when one sits beside it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from runfolder_fixtures import synthetic_run
from scipy.stats import spearmanr
from test_report import assert_self_contained, parse

from keyspace.analyze.pca import AnalyzeConfig
from keyspace.reports.build import build_report
from keyspace.reports.validate_report import write_validate_report

LAYERS, Q_HEADS, HEAD_DIM = 3, 4, 64
RANKS = [[20, 24, 30, 36], [40, 40, 44, 48], [12, 40, 50, 52]]  # mean 36.33


def result(method, d, k, mode, ppl, share):
    return {
        "method": method,
        "d": d,
        "d_mean": float(d) if d else None,
        "k": k,
        "k_mode": mode,
        "ppl": ppl,
        "nll": 0.0,
        "tokens": 4096,
        "predicted_tokens": 4092,
        "kv_bytes_fraction": share,
        "seconds": 1.0,
    }


def recall(d, k, level):
    grid = [[level + 0.01 * (layer + head) for head in range(Q_HEADS)] for layer in range(LAYERS)]
    per_layer = [sum(row) / Q_HEADS for row in grid]
    stat = {"rho": -0.5, "p": 0.01, "n": LAYERS * Q_HEADS}
    fields = ("topk_recall", "mass_recall", "relative_mass_recall")
    return {
        "d": d,
        "k": k,
        "k_mode": "window",
        "rows": 3584,
        **{f: grid for f in fields},
        "per_layer": {f: per_layer for f in fields},
        "rank_kind": "post",
        "rank_threshold": 0.9,
        "rank": RANKS,
        "spearman_rank_vs_topk": stat,
        "spearman_rank_vs_mass": stat,
        "spearman_rank_vs_relative_mass": stat,
    }


def make_doc(windows: int = 4, prompts: int = 4, trials: int = 4) -> dict:
    results = [
        result("full", None, None, None, 20.0, 1.0),
        result("loki", "16", 0.125, "window", 26.0, 0.25),
        result("loki", "32", 0.25, "window", 20.5, 0.5),
        result("loki", "16", 0.125, "row", 58.0, 0.25),
        result("h2o", None, 0.125, "window", 22.4, 0.125),
        result("pcaattn", "16", None, None, 174.0, 0.625),
    ]
    measured = [
        {"batch": 16, "q_heads": 9, "kv_heads": 3, "head_dim": 64, "seq": 4096, "d": 16,
         "k_frac": 0.125, "select": "group", "dtype": "float16", "sdpa_ms": 0.04, "loki_ms": 0.03,
         "speedup": 1.33, "floor_speedup": 3.99, "loki_pct_floor": 16.0},
    ]  # fmt: skip
    return {
        "keyspace_version": "0.1.0",
        "run": "runs/x",
        "model": {"spec": "smollm2-135m", "identity": "gguf:abc"},
        "dataset": {"spec": "wikitext", "split": "test", "window": 1024, "windows": windows},
        "rotary": "post",
        "gqa_select": "head",
        "head_dim": HEAD_DIM,
        "k_modes": ["window", "row"],
        "grid": {"d": ["16", "32"], "k": [0.125, 0.25], "methods": ["loki", "full"]},
        "device": "cpu",
        "dtype": "float32",
        "results": results,
        "recall": [recall("16", 0.125, 0.7), recall("32", 0.25, 0.85)],
        "decode": [
            {
                "method": "loki",
                "d": "32",
                "k": 0.125,
                "k_mode": "row",
                "gqa_select": "head",
                "prompts": prompts,
                "prompt_tokens": 512,
                "tokens": 32,
                "token_agreement": 0.34375,
                "forced_agreement": 0.90625,
                "nll_sparse": 0.95,
                "nll_dense": 0.87,
            },
        ],  # fmt: skip
        "passkey": [
            {
                "method": "full",
                "d": None,
                "k": None,
                "length": 2048,
                "count": trials,
                "correct": trials,
                "accuracy": 1.0,
            },
            {
                "method": "loki",
                "d": "32",
                "k": 0.125,
                "length": 2048,
                "count": trials,
                "correct": trials - 1,
                "accuracy": (trials - 1) / trials,
            },
        ],  # fmt: skip
        "speed": {"analytic": [], "measured": measured},
    }


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "validate"
    paths = write_validate_report(make_doc(), out)
    return out, paths


def test_files_and_self_contained(page):
    out, paths = page
    assert paths[0] == out / "validate.html" and all(p.is_file() for p in paths)
    assert plt.get_fignums() == []
    parsed = assert_self_contained(paths[0])
    assert {img["data-file"] for img in parsed.images} == {p.name for p in paths[1:]}
    assert {"validate_pareto-window.png", "validate_pareto-row.png"} <= {p.name for p in paths}
    assert "validate_pareto_time.png" in {p.name for p in paths}
    assert parsed.related == []  # no rank report one folder up


def test_headline_numbers_come_from_the_document(page):
    assert parse(page[0] / "validate.html").headline == (
        "Post-RoPE keys need a mean 36.3 of 64 dimensions for 90% of their variance. Loki in"
        " the paper's key basis: perplexity 26.00 vs 20.00 dense (+30.0%) at d=16, k=1/8,"
        " reading 25% of the KV bytes, and 20.50 (+2.5%) at d=32, k=1/4, reading 50% (4 windows"
        " of 1024 tokens of wikitext (test), k chosen per window)."
    )


def test_headline_with_one_setting_and_no_ranks(tmp_path):
    doc = make_doc(windows=1)
    doc["results"] = [r for r in doc["results"] if r["method"] != "loki" or r["d"] == "32"]
    doc["recall"], doc["k_modes"] = [], ["window"]
    write_validate_report(doc, tmp_path)
    assert parse(tmp_path / "validate.html").headline == (
        "Loki in the paper's key basis: perplexity 20.50 vs 20.00 dense (+2.5%) at d=32, k=1/4,"
        " reading 50% of the KV bytes (1 window of 1024 tokens of wikitext (test))."
    )


def test_tables_hold_the_numbers(page):
    parsed = parse(page[0] / "validate.html")
    rows = parsed.table("perplexity")
    header = rows[0]
    assert "KV bytes read (% of dense)" in header
    cells = {(r[0], r[1], r[2], r[3]): dict(zip(header, r, strict=True)) for r in rows[1:]}
    assert len(cells) == len(make_doc()["results"])
    for r in make_doc()["results"]:
        d = r["d"] or "-"
        k = {None: "-", 0.125: "1/8", 0.25: "1/4"}[r["k"]]
        row = cells[(r["method"], d, k, r["k_mode"] or "-")]
        assert row["perplexity"] == f"{r['ppl']:.3f}"
        assert row["KV bytes read (% of dense)"] == f"{100 * r['kv_bytes_fraction']:.1f}%"
        assert row["vs dense"] == f"{100 * (r['ppl'] / 20.0 - 1):+.1f}%"
    decode = parsed.table("decode")
    row = dict(zip(decode[0], decode[1], strict=True))
    assert row["k-mode"] == "row" and row["teacher-forced agreement"] == "0.906"
    assert row["free-running agreement"] == "0.344" and row["NLL Loki"] == "0.950"
    passkey = parsed.table("passkey")
    assert passkey[0] == ["method", "d", "k", "context length", "correct"]
    assert passkey[2] == ["loki", "32", "1/8", "2048", "3/4"]
    recall = parsed.table("recall")
    grid = make_doc()["recall"][0]["topk_recall"]
    mean = sum(map(sum, grid)) / (LAYERS * Q_HEADS)
    rho, p = spearmanr([r for row in RANKS for r in row], [v for row in grid for v in row])
    assert recall[1] == [
        "16",
        "1/8",
        "window",
        "3584",
        "top-k recall",
        f"{mean:.3f}",
        f"{rho:+.2f}",
        "key rank",
        f"{p:.1g}",
        str(LAYERS * Q_HEADS),  # every query head has its own KV head here (G = 1)
    ]
    timing = parsed.table("timing")
    assert timing[1][:7] == ["4096", "16", "1/8", "group", "0.040", "0.030", "1.33×"]


@pytest.mark.parametrize(
    ("windows", "prompts", "trials", "expected"),
    [
        (4, 4, 4, []),
        (1, 4, 4, ["1 window of 1024 tokens"]),
        (4, 2, 4, ["used 2 prompts"]),
        (4, 4, 1, ["used 1 prompt per length"]),
        (1, 1, 2, ["1 window of", "used 1 prompt;", "used 2 prompts per length"]),
    ],
)
def test_small_sample_warning_only_when_small(tmp_path, windows, prompts, trials, expected):
    write_validate_report(make_doc(windows, prompts, trials), tmp_path)
    text = (tmp_path / "validate.html").read_text(encoding="utf-8")
    warnings = parse(tmp_path / "validate.html").warnings
    assert "1 windows" not in text and "1 prompts" not in text
    if not expected:
        assert warnings == []
        return
    assert len(warnings) == 1 and warnings[0].startswith("Small sample:")
    assert all(part in warnings[0] for part in expected)


def test_older_documents_without_newer_fields_render(tmp_path):
    doc = make_doc()
    for entry in doc["recall"]:
        del entry["relative_mass_recall"], entry["per_layer"]["relative_mass_recall"]
    del doc["decode"][0]["forced_agreement"], doc["decode"][0]["k_mode"]
    doc["speed"] = {"analytic": [], "measured": None}
    paths = write_validate_report(doc, tmp_path)
    parsed = assert_self_contained(paths[0])
    decode = parsed.table("decode")
    assert dict(zip(decode[0], decode[1], strict=True))["teacher-forced agreement"] == "n/a"
    assert "mass / exact top-k mass" not in {r[4] for r in parsed.table("recall")[1:]}
    assert not any("timing" == attrs.get("class") for attrs, _ in parsed.tables)


def test_without_dense_the_page_says_so(tmp_path):
    doc = make_doc()
    doc["results"] = [r for r in doc["results"] if r["method"] != "full"]
    write_validate_report(doc, tmp_path)
    parsed = parse(tmp_path / "validate.html")
    assert parsed.headline.endswith("; this run measured no dense baseline.")
    assert "vs dense" not in parsed.table("perplexity")[0]


def test_a_minimal_document_renders(tmp_path):
    doc = make_doc()
    doc["results"] = [r for r in doc["results"] if r["method"] in ("full", "h2o")]
    doc.update(recall=[], decode=[], passkey=[], speed={})
    write_validate_report(doc, tmp_path)
    parsed = parse(tmp_path / "validate.html")
    assert parsed.headline == (
        "No Loki setting was measured; h2o's perplexity is 22.40 vs 20.00 dense (+12.0%) at"
        " k=1/8, reading 12% of the KV bytes (4 windows of 1024 tokens of wikitext (test), k"
        " chosen per window)."
    )
    assert [attrs["class"] for attrs, _ in parsed.tables] == ["perplexity"]


# ---- the two reports link to each other when they sit side by side --------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("runs") / "run", layers=2, heads=2)


def rank_report(run, out):
    return build_report([run], out, AnalyzeConfig((0.9,))).index


@pytest.mark.parametrize("rank_first", [True, False])
def test_reports_side_by_side_link_both_ways(run, tmp_path, rank_first):
    index = tmp_path / "index.html"
    if rank_first:
        rank_report(run, tmp_path)
        write_validate_report(make_doc(), tmp_path / "validate")
    else:
        write_validate_report(make_doc(), tmp_path / "validate")
        rank_report(run, tmp_path)
    assert parse(index).related == ["validate/validate.html"]
    assert parse(tmp_path / "validate" / "validate.html").related == ["../index.html"]
    assert_self_contained(index)
    assert_self_contained(tmp_path / "validate" / "validate.html")


def test_no_link_without_a_sibling(run, tmp_path):
    rank_report(run, tmp_path / "rank")
    write_validate_report(make_doc(), tmp_path / "rank" / "elsewhere")  # not validate/
    (tmp_path / "validate").mkdir()
    (tmp_path / "index.html").write_text("<html>not a keyspace report</html>")
    write_validate_report(make_doc(), tmp_path / "validate")
    assert parse(tmp_path / "rank" / "index.html").related == []
    assert parse(tmp_path / "rank" / "elsewhere" / "validate.html").related == []
    assert parse(tmp_path / "validate" / "validate.html").related == []
    assert (tmp_path / "index.html").read_text() == "<html>not a keyspace report</html>"


def test_validate_outputs_call_site(tmp_path):
    """validate's writer (wherever the validate stage keeps it) still writes JSON + report."""
    from keyspace.validate import results  # a moved module must fail here, not skip

    doc = make_doc()
    paths = results.write_outputs(copy.deepcopy(doc), tmp_path)
    assert json.loads((tmp_path / "validate.json").read_text()) == doc
    assert tmp_path / "validate.html" in paths


def test_the_models_own_decode_speed_is_shown_and_drives_the_time_pareto(tmp_path):
    doc = make_doc()
    doc["speed"]["decode"] = [
        {"d": 16, "k": 0.125, "batch": 16, "seq": 4061, "steps": 32, "gqa_select": "group",
         "dense_step_ms": 8.0, "loki_step_ms": 5.0, "dense_tokens_per_s": 2000.0,
         "loki_tokens_per_s": 3200.0, "speedup": 1.6},
    ]  # fmt: skip
    write_validate_report(doc, tmp_path)
    text = (tmp_path / "validate.html").read_text()
    assert "3200" in text and "2000" in text and "1.60×" in text and "4061-token prompt" in text
    assert (tmp_path / "validate_pareto_time.png").is_file()
    from keyspace.reports.validate_report import measured_time_points

    ratios = {(r["d"], r["k"]): ratio for r, ratio in measured_time_points(doc)}
    assert ratios == {("16", 0.125): pytest.approx(5.0 / 8.0)}  # the decode loop, not the kernels
    doc["speed"]["decode"] = None
    assert {(r["d"], r["k"]): x for r, x in measured_time_points(doc)} == {
        ("16", 0.125): pytest.approx(0.03 / 0.04)
    }


def task_row(method, d, k, task, accuracy, low, high):
    return {"method": method, "d": d, "k": k, "task": task, "length": 1024, "accuracy": accuracy,
            "ci_low": low, "ci_high": high, "count": 10, "scoring": "exact"}  # fmt: skip


def test_tasks_section_holds_the_numbers_and_the_heatmap(tmp_path):
    doc = make_doc()
    doc["tasks"] = [
        task_row("full", None, None, "niah", 1.0, 0.72, 1.0),
        task_row("loki", 32, 0.125, "niah", 0.9, 0.6, 0.98),
        task_row("h2o", None, 0.125, "niah", 0.3, 0.11, 0.6),
        task_row("full", None, None, "mv-niah", 0.78, 0.65, 0.9),
        task_row("loki", 32, 0.125, "mv-niah", 0.4, 0.25, 0.55),
        task_row("h2o", None, 0.125, "mv-niah", 0.2, 0.1, 0.3),
    ]
    doc["task_setup"] = {"tasks": ["niah", "mv-niah"], "lengths": [1024], "count": 10,
                         "haystack": "filler", "seed": 0}  # fmt: skip
    paths = write_validate_report(doc, tmp_path)
    parsed = assert_self_contained(paths[0])
    assert "validate_tasks.png" in {img["data-file"] for img in parsed.images}
    assert (tmp_path / "validate_tasks.png").is_file() and plt.get_fignums() == []
    assert "Long-context tasks" in (tmp_path / "validate.html").read_text()
    table = parsed.table("tasks")
    cells = [dict(zip(table[0], r, strict=True)) for r in table[1:]]
    assert [(c["task"], c["method"], c["accuracy"]) for c in cells] == [
        (r["task"], r["method"], f"{r['accuracy']:.2f}") for r in doc["tasks"]
    ]
    loki = cells[4]
    # No per-prompt scores in this doc (as in validate.json before them): the point difference.
    assert loki["95% interval"] == "[0.25, 0.55]" and loki["vs dense [paired 95%]"] == "-0.38"
    assert loki["d"] == "32" and loki["k"] == "1/8" and loki["prompts"] == "10"
    assert parsed.headline.endswith(
        " On the long-context tasks, in the paper's key basis Loki loses most on mv-niah at 1024"
        " tokens: 0.40 [0.25, 0.55] at d=32, k=1/8 vs 0.78 [0.65, 0.90] dense."
    )


def test_without_tasks_there_is_no_tasks_section(page):
    text = (page[0] / "validate.html").read_text()
    assert "Long-context tasks" not in text and "validate_tasks.png" not in text
    assert "long-context" not in parse(page[0] / "validate.html").headline


def test_two_bases_get_a_basis_column_and_named_settings(tmp_path):
    doc = make_doc()
    doc["basis"] = ["key", "query-aware"]
    extra = result("loki", "16", 0.125, "window", 20.2, 0.25)
    extra["basis"] = "query-aware"
    for r in doc["results"]:
        r["basis"] = "key" if r["method"] in ("loki", "pcaattn") else None
    doc["results"].append(extra)
    write_validate_report(doc, tmp_path)
    parsed = parse(tmp_path / "validate.html")
    table = next(rows for attrs, rows in parsed.tables if "perplexity" in attrs.get("class", ""))
    assert table[0][:2] == ["method", "basis"]
    assert ["loki", "query-aware", "16", "1/8", "window", "20.200"] in [r[:6] for r in table]
    assert ["loki", "key", "16", "1/8", "window", "26.000"] in [r[:6] for r in table]
    # the headline leads with the paper's key basis and names the basis of the best setting
    assert "Loki in the paper's key basis: perplexity 26.00" in parsed.headline
    assert "its best setting is in the query-aware basis: 20.20 (+1.0%) at d=16" in parsed.headline
    doc["basis"] = ["key"]  # one basis: no column
    write_validate_report(doc, tmp_path / "one")
    table = next(
        rows
        for attrs, rows in parse(tmp_path / "one" / "validate.html").tables
        if "perplexity" in attrs.get("class", "")
    )
    assert table[0][:2] == ["method", "d"]


def test_heatmap_rows_name_the_basis_once():
    from keyspace.reports.validate_figures import task_variant

    assert task_variant({"method": "full", "d": None, "k": None}) == "full"
    assert (
        task_variant({"method": "loki", "d": 32, "k": 0.125, "basis": "key"}) == "loki d=32, k=1/8"
    )
    assert (
        task_variant({"method": "loki", "d": 16, "k": 0.25, "basis": "query-aware"})
        == "loki (query-aware) d=16, k=1/4"
    )
    assert task_variant({"method": "h2o", "d": None, "k": 0.125}) == "h2o k=1/8"


def crowded_rows(points: int) -> list[dict]:
    """Loki rows at nearly one spot, plus dense: their labels cannot all sit clear."""
    rows = [{"method": "full", "d": None, "k": None, "k_mode": None, "ppl": 10.0,
             "kv_bytes_fraction": 1.0}]  # fmt: skip
    for i in range(points):
        rows.append({"method": "loki", "d": 16 + i, "k": 0.125, "k_mode": "window",
                     "ppl": 10.1 + 0.01 * i, "kv_bytes_fraction": 0.3 + 0.002 * i,
                     "basis": "query-aware" if i % 2 else "key"})  # fmt: skip
    return rows


def test_crowded_pareto_labels_become_numbers_named_in_a_key():
    from keyspace.reports.validate_figures import pareto

    fig = pareto(crowded_rows(8), "window")
    point_labels = [t.get_text() for t in fig.axes[0].texts if not t.get_text().startswith("dense")]
    assert point_labels == [str(i) for i in range(1, 9)]
    key = [t.get_text() for t in fig.legends[-1].get_texts()]
    assert key[0] == "1  d=16, k=1/8, key" and key[1] == "2  d=17, k=1/8, query-aware"
    assert len(key) == 8
    plt.close(fig)

    fig = pareto(crowded_rows(1), "window")  # one label fits: it is the setting itself
    assert "d=16, k=1/8, key" in [t.get_text() for t in fig.axes[0].texts]
    assert len(fig.legends) == 1
    plt.close(fig)


def test_tasks_table_gives_the_paired_difference_when_the_rows_have_it(tmp_path):
    doc = make_doc()
    loki = task_row("loki", 32, 0.125, "niah", 0.6, 0.3, 0.85)
    loki.update(vs_full=-0.4, vs_full_low=-0.7, vs_full_high=-0.1)
    doc["tasks"] = [task_row("full", None, None, "niah", 1.0, 0.72, 1.0), loki]
    doc["task_setup"] = {"tasks": ["niah"], "lengths": [1024], "count": 10,
                         "haystack": "filler", "seed": 0}  # fmt: skip
    parsed = assert_self_contained(write_validate_report(doc, tmp_path)[0])
    table = parsed.table("tasks")
    cells = [dict(zip(table[0], r, strict=True)) for r in table[1:]]
    assert [c["vs dense [paired 95%]"] for c in cells] == ["-", "-0.40 [-0.70, -0.10]"]


# ---- the headline on the result files in results/ -----------------------------------------------

RESULTS = Path(__file__).resolve().parents[1] / "results"


def validate_documents() -> list[Path]:
    """The validate.json files in results/. The bench, e2e and calibration-study files there are
    other kinds of record (no `results` rows, no model): they are left out by their shape."""
    found = []
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and {"results", "model", "dataset"} <= doc.keys():
            found.append(path)
    return found


BASIS_NAMES = {"key": "the paper's key basis", "query-aware": "the query-aware basis"}


def nearest_basis(text: str, at: int) -> str | None:
    """The basis named last before position `at` in the headline."""
    named = [(text.rfind(name, 0, at), basis) for basis, name in BASIS_NAMES.items()]
    position, basis = max(named)
    return basis if position >= 0 else None


@pytest.mark.parametrize("path", validate_documents(), ids=lambda p: p.stem)
def test_every_headline_number_stands_after_its_own_basis(path):
    from keyspace.reports.validate_report import LOKI_FAMILY, bare_setting, headline
    from keyspace.reports.validate_tables import interval

    doc = json.loads(path.read_text())
    text = headline(doc)
    # the headline weighs loki-adaptive with loki (LOKI_FAMILY); a diverged row (null) is left out
    loki = [r for r in doc["results"] if r["method"] in LOKI_FAMILY and r["ppl"] is not None]
    quoted = 0
    for row in loki:
        number = f" {row['ppl']:.2f}"
        if number in text and sum(f" {r['ppl']:.2f}" == number for r in loki) == 1:
            quoted += 1
            assert nearest_basis(text, text.index(number)) == (row.get("basis") or "key"), number
    assert quoted >= (1 if loki else 0)
    cells = {}  # the text a task clause quotes -> the bases of the rows that read so
    for row in doc.get("tasks") or []:
        if row["method"] in LOKI_FAMILY:
            cell = (
                f"{row['task']} at {row['length']} tokens: {interval(row)} at {bare_setting(row)}"
            )
            cells.setdefault(cell, set()).add(row.get("basis") or "key")
    for cell, bases in cells.items():
        for found in re.finditer(re.escape(cell), text):
            assert nearest_basis(text, found.start()) in bases, cell
    assert len(validate_documents()) >= 20


def test_the_h200_8192_headline_gives_each_basis_its_own_task_numbers():
    """The issue's case: the key basis's 0.02 on niah-uuid stood after the query-aware basis."""
    from keyspace.reports.validate_report import headline

    doc = json.loads((RESULTS / "tasks-smollm2-h200-8192-cal8192.json").read_text())
    text = headline(doc)
    key, query = text.split("On the long-context tasks, ")[1].split("; in the query-aware basis")
    assert key.startswith(
        "in the paper's key basis Loki loses most on niah-uuid at 8192 tokens: 0.02"
    )
    assert "0.02 [" not in query
    # the paper's key basis comes first, beside the best setting (query-aware, d=32, k=1/8)
    assert text.index("the paper's key basis: perplexity 12.75") < text.index(
        "its best setting is in the query-aware basis: 11.10 (+1.3%) at d=32, k=1/8"
    )
    doc = json.loads((RESULTS / "tasks-smollm2-h200-4096.json").read_text())
    assert (
        "in the query-aware basis Loki loses most on niah-uuid at 4096 tokens: 0.00 [0.00, 0.07]"
        in headline(doc)
    )


# ---- the Pareto plot: told apart near dense, one marker per basis, labels clear of each other ----


def pareto_cases():
    cases = [("crowded-8", crowded_rows(8), "window"), ("crowded-3", crowded_rows(3), "window")]
    for path in validate_documents():
        doc = json.loads(path.read_text())
        for mode in (doc.get("k_modes") or [None])[:1]:
            cases.append((path.stem, doc["results"], mode))
    return cases


@pytest.mark.parametrize(
    "name, rows, mode", pareto_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_pareto_labels_never_overlap_and_ticks_cover_the_data(name, rows, mode):
    from keyspace.reports.validate_figures import pareto

    fig = pareto(rows, mode)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    labels = [t for ax in fig.axes for t in ax.texts if not t.get_text().startswith("dense")]
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            shared = max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(
                0, min(a.y1, b.y1) - max(a.y0, b.y0)
            )
            assert shared == 0, (name, labels[i].get_text())
    for ax in fig.axes:
        low, high = ax.get_ylim()
        ticks = [t for t in ax.get_yticks() if low <= t <= high]
        assert len(ticks) >= 3, (name, ticks)
        # every drawn point lies within the ticked range, widened by one tick step
        step = min(b - a for a, b in zip(ticks, ticks[1:], strict=False))
        for collection in ax.collections:
            for _, y in collection.get_offsets():
                assert ticks[0] - step * (2 if ax.get_yscale() == "log" else 1) <= y, (name, y)
    plt.close(fig)


def test_settings_within_five_percent_of_dense_are_told_apart():
    """The issue's case: both Lokis, SparQ and exact-topk at 11.1–11.5 against dense 10.96 sat
    within about 15 px; in the lower panel they are at least 20 px apart per 0.1 perplexity."""
    from keyspace.reports.validate_figures import pareto

    doc = json.loads((RESULTS / "tasks-smollm2-h200-8192-cal8192.json").read_text())
    fig = pareto(doc["results"], "window")
    fig.draw_without_rendering()
    lower = fig.axes[1]
    y0, y1 = (lower.transData.transform([(0, v)])[0][1] for v in (11.10, 11.27))
    assert abs(y1 - y0) >= 30  # display px at 100 dpi
    fills = {c.get_facecolor()[0][3] for c in lower.collections if len(c.get_offsets())}
    assert any(c.get_facecolor()[0][:3].tolist() == [1.0, 1.0, 1.0] for c in lower.collections)
    assert len(fills) >= 1
    plt.close(fig)


def test_recall_is_read_per_kv_head_against_the_rank_of_its_basis():
    """Ranks repeat over each KV head's 3 query heads: ρ and p count 2 layers × 2 KV heads, not
    12 query heads; the query-aware entry is read against its score rank."""
    from keyspace.reports.validate_recall import kv_recall

    rank = [[10, 10, 10, 30, 30, 30], [20, 20, 20, 40, 40, 40]]
    score = [[5, 5, 5, 9, 9, 9], [7, 7, 7, 3, 3, 3]]
    topk = [[0.9, 0.8, 0.7, 0.5, 0.5, 0.5], [0.6, 0.6, 0.6, 0.2, 0.3, 0.4]]
    entry = {"d": 16, "k": 0.125, "basis": "key", "rank": rank, "score_rank": score,
             "topk_recall": topk}  # fmt: skip
    kv = kv_recall(entry, "topk_recall")
    assert kv.group == 3 and kv.n == 4 and kv.rank_name == "key rank"
    assert kv.rank.tolist() == [[10, 30], [20, 40]]
    assert kv.recall.round(6).tolist() == [[0.8, 0.5], [0.6, 0.3]]
    assert kv.rho == pytest.approx(spearmanr([10, 30, 20, 40], [0.8, 0.5, 0.6, 0.3]).statistic)
    aware = kv_recall({**entry, "basis": "query-aware"}, "topk_recall")
    assert aware.rank_name == "score rank" and aware.rank.tolist() == [[5, 9], [7, 3]]
    older = {k: v for k, v in entry.items() if k != "score_rank"} | {"basis": "query-aware"}
    assert kv_recall(older, "topk_recall").rank_name == "key rank"  # what the file holds


def test_scatter_points_carry_their_layer_and_head_as_tooltips(page):
    text = (page[0] / "validate.html").read_text()
    tips = re.findall(r"<circle [^>]*><title>([^<]*)</title>", text)
    assert tips and all(t.startswith("layer ") and "KV head" in t for t in tips)
    assert "layer 2, KV head 3: key rank 52" in text


# ---- keyspace report: any validate.json in, validate.html out ------------------------------------


def other_records() -> list[Path]:
    """The JSON files in results/ that are not validate.json (bench, e2e, study records)."""
    return sorted(set(RESULTS.glob("*.json")) - set(validate_documents()))


@pytest.mark.parametrize("path", validate_documents(), ids=lambda p: p.stem)
def test_keyspace_report_renders_every_validate_json_in_results(path, tmp_path):
    from typer.testing import CliRunner

    from keyspace.cli.main import app

    out = tmp_path / "page"
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    parsed = assert_self_contained(out / "validate.html")
    doc = json.loads(path.read_text())
    assert parsed.headline.startswith(("Loki in ", "Post-RoPE", "Pre-RoPE", "No Loki"))
    text = (out / "validate.html").read_text()
    # provenance: what the file holds is shown, what it lacks is "not recorded", never guessed
    subtitle = re.search(r'<div class="subtitle">(.*?)</div>', text).group(1)
    assert doc["model"]["identity"][:12] in text and doc["model"]["identity"] not in subtitle
    assert not re.search(r"[0-9a-f]{64}", subtitle)  # no full hash in the subtitle
    if "gqa_select" not in doc:
        assert "selection per not recorded" in text
    assert 'download="validate.json"' in text and 'download="perplexity.csv"' in text


def test_keyspace_report_refuses_other_records_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from keyspace.cli.main import app

    assert other_records(), "results/ holds bench and e2e records too"
    for path in other_records():
        result = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path)])
        assert result.exit_code == 2, path
        assert result.output.startswith(f"Error: {path} is not a validate.json"), result.output
    assert not (tmp_path / "validate.html").exists()


def test_a_diverged_row_written_as_null_renders_as_n_a(tmp_path, capsys):
    """validate.json writes a diverged method's NaN/infinity as null: `keyspace report` renders
    the file, the table shows n/a, the headline and the figures leave the row out; the printed
    table says n/a too."""
    from typer.testing import CliRunner

    from keyspace.cli.main import app
    from keyspace.cli.validate import _print_table
    from keyspace.runfolder.files import write_json_atomic
    from keyspace.validate.results import validate_doc_problem

    doc = make_doc()
    doc["results"][2].update(ppl=float("nan"), nll=float("inf"))  # loki d=32, the best setting
    doc["results"][4].update(ppl=float("inf"), kv_bytes_fraction=float("nan"))  # h2o
    write_json_atomic(tmp_path / "validate.json", doc)
    stored = json.loads((tmp_path / "validate.json").read_text())
    assert stored["results"][2]["ppl"] is None and stored["results"][4]["kv_bytes_fraction"] is None
    assert validate_doc_problem(stored) is None
    result = CliRunner().invoke(app, ["report", str(tmp_path / "validate.json"), "--out", str(tmp_path / "p")])  # fmt: skip
    assert result.exit_code == 0, result.output
    parsed = assert_self_contained(tmp_path / "p" / "validate.html")
    table = parsed.table("perplexity")
    cells = [dict(zip(table[0], row, strict=True)) for row in table[1:]]
    h2o = next(c for c in cells if c["method"] == "h2o")
    assert (h2o["perplexity"], h2o["vs dense"], h2o["KV bytes read (% of dense)"]) == ("n/a",) * 3
    assert [c["perplexity"] for c in cells].count("n/a") == 2
    assert "20.50" not in parsed.headline and "nan" not in parsed.headline.lower()
    _print_table(stored)
    assert "n/a" in capsys.readouterr().out


# ---- new labels: token budgets, loki-adaptive, long heatmap row names ---------------------------


def budget_task_rows() -> list[dict]:
    """Dense, Loki and loki-adaptive in both bases, each at k=1/8 and at a 2048-token budget:
    row names up to 'loki-adaptive (query-aware) d=16, k=2048 tok'."""
    rows = []
    for task in ("niah", "niah-word", "niah-uuid", "mv-niah"):
        rows.append({"method": "full", "d": None, "k": None, "basis": None, "task": task,
                     "length": 4096, "accuracy": 0.9, "scoring": "exact", "k_budget": None})  # fmt: skip
        for method in ("loki", "loki-adaptive"):
            for basis in ("key", "query-aware"):
                for k, budget in ((0.125, None), (None, 2048)):
                    rows.append({"method": method, "d": 16, "k": k, "basis": basis, "task": task,
                                 "length": 4096, "accuracy": 0.98, "k_budget": budget,
                                 "scoring": "recall" if task == "mv-niah" else "exact"})  # fmt: skip
    return rows


def test_task_heatmap_numbers_stay_inside_their_cells_beside_long_row_names(recwarn):
    """The long row names of token budgets and loki-adaptive squeezed the cells until their
    numbers ran into each other ('0.980.900.70'); and the slanted task names overlapped."""
    from keyspace.reports.validate_figures import task_heatmap

    fig = task_heatmap(budget_task_rows())
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    assert "loki-adaptive (query-aware) d=16, k=2048 tok" in [
        t.get_text() for t in ax.get_yticklabels()
    ]
    (x0, _), (x1, _) = ax.transData.transform([(0, 0), (1, 0)])
    cell = abs(x1 - x0)
    for text in ax.texts:
        assert text.get_window_extent(renderer).width < 0.8 * cell, text.get_text()
    for tick in ax.get_xticklabels():  # slanted names are parallel strips a cell apart
        line = tick.get_fontsize() * fig.dpi / 72 * 1.2
        assert cell * np.sin(np.radians(tick.get_rotation())) >= line, tick.get_text()
    figure = fig.bbox
    for label in ax.get_yticklabels():
        assert label.get_window_extent(renderer).x0 >= figure.x0
    assert not [w for w in recwarn if "constrained_layout not applied" in str(w.message)]
    plt.close(fig)


def test_loki_adaptive_points_are_named_and_their_basis_is_in_the_legend():
    """loki-adaptive was drawn small, unlabelled, in the legend as a filled marker while its
    query-aware points were hollow: two d on one page could not be told apart."""
    from matplotlib.colors import to_rgb

    from keyspace.reports.validate_figures import MAX_TEXT_LUMINANCE, pareto

    rows = [{"method": "loki-adaptive", "d": d, "k": 0.125, "k_mode": "row", "ppl": ppl,
             "kv_bytes_fraction": share, "basis": "query-aware", "k_budget": None}
            for d, ppl, share in ((16, 22.97, 0.25), (32, 22.42, 0.375))]  # fmt: skip
    rows.append({**rows[0], "d": 16, "k": None, "k_budget": 2048, "kv_bytes_fraction": 0.3,
                 "ppl": 22.7, "basis": "key"})  # fmt: skip
    fig = pareto(rows, "row")
    fig.draw_without_rendering()
    texts = {t.get_text(): t for t in fig.axes[0].texts}
    assert "loki-adaptive d=16, k=1/8, query-aware" in texts
    assert "loki-adaptive d=32, k=1/8, query-aware" in texts
    assert "loki-adaptive d=16, k=2048 tok, key" in texts
    for text in texts.values():  # the pale marker colour, darkened to read on white
        assert (
            np.dot(to_rgb(text.get_color()), [0.2126, 0.7152, 0.0722]) <= MAX_TEXT_LUMINANCE + 1e-6
        )
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["loki-adaptive (key basis)", "loki-adaptive (query-aware basis)"]
    plt.close(fig)

    only = pareto(rows[:2], "row")  # one basis, query-aware: the hollow marker is explained
    assert [t.get_text() for t in only.legends[0].get_texts()] == [
        "loki-adaptive (query-aware basis)"
    ]
    plt.close(only)


def test_a_long_legend_stays_inside_the_figure():
    from keyspace.reports.validate_figures import pareto

    rows = [{"method": "full", "d": None, "k": None, "k_mode": None, "ppl": 12.74,
             "kv_bytes_fraction": 1.0, "basis": None}]  # fmt: skip
    for method in ("loki", "loki-adaptive", "exact-topk", "h2o", "sparq"):
        for basis in ("key", "query-aware"):
            rows.append({"method": method, "d": 16, "k": 0.125, "k_mode": "window",
                         "ppl": 13.0 + len(rows) * 0.3, "kv_bytes_fraction": 0.25,
                         "basis": basis})  # fmt: skip
    for width in (8.0, 5.4):
        fig = pareto(rows, "window", width=width)
        fig.draw_without_rendering()
        box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, width
        plt.close(fig)
