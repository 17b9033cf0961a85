"""rank-report: files, self-containment, headline and HTML numbers equal ranks.json, the run
folder left untouched, and the CLI's errors. The page checks here serve test_validate_report too."""

from __future__ import annotations

import hashlib
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from runfolder_fixtures import low_rank_keys, synthetic_run, write_run
from test_query_spectrum import synthetic_query_run
from typer.testing import CliRunner

from keyspace.analyze.pca import AnalyzeConfig, analyze_and_write, write_ranks
from keyspace.cli.main import app
from keyspace.reports import build, figures
from keyspace.reports.build import build_report
from keyspace.reports.rank_page import head_selection
from keyspace.runfolder.analysis import read_ranks
from keyspace.runfolder.store import CHECKSUM_FIELD

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


class Tables(HTMLParser):
    """Collect every table (by class) as rows of cell texts, every <img>, every src/href, the
    headline, the warning boxes and the related-report links."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[dict, list[list[str]]]] = []
        self.images: list[dict] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.headline = ""
        self.warnings: list[str] = []
        self.related: list[str] = []
        self._cell: list[str] | None = None
        self._block: list[str] | None = None
        self._into = ""
        self._in_related = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [(tag, k, v or "") for k, v in attrs.items() if k in ("src", "href")]
        css = attrs.get("class") or ""
        if tag == "table":
            self.tables.append((attrs, []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "p" and css == "headline" or tag == "div" and css == "warning":
            self._block, self._into = [], css
        elif tag == "nav" and css == "related":
            self._in_related = True
        elif tag == "a" and self._in_related:
            self.related.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("p", "div") and self._block is not None:
            text = "".join(self._block).strip()
            if self._into == "headline":
                self.headline = text
            else:
                self.warnings.append(text)
            self._block = None
        elif tag == "nav":
            self._in_related = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._block is not None:
            self._block.append(data)

    def table(self, css_class: str, **attrs) -> list[list[str]]:
        for table_attrs, rows in self.tables:
            if table_attrs.get("class") == css_class and all(
                table_attrs.get(k) == v for k, v in attrs.items()
            ):
                return rows
        raise AssertionError(f"no table {css_class} {attrs}")


def parse(index: Path) -> Tables:
    parser = Tables()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


SIBLING_LINKS = ("../index.html", "validate/validate.html")
DATA_LINKS = ("data:text/csv;base64,", "data:application/json;base64,")  # the page's own data


def assert_self_contained(page: Path) -> Tables:
    """Every image is a data URI; links stay in the page or go to a sibling report only."""
    text = page.read_text(encoding="utf-8")
    parsed = parse(page)
    for tag, attribute, value in parsed.links:
        if attribute == "src":
            assert value.startswith("data:image/png;base64,"), f"<{tag} src={value[:40]}>"
        else:
            assert value.startswith(("#", *DATA_LINKS)) or value in SIBLING_LINKS, (
                f"<{tag} href={value[:60]}>"
            )
    assert not re.search(r"""\b(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.I)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", text, re.I)
    assert parsed.images and all(img["data-file"].endswith(".png") for img in parsed.images)
    return parsed


def test_self_containment_check_catches_file_images(tmp_path):
    page = tmp_path / "page.html"
    for bad in ('<img src="x.png" data-file="x.png">', '<a href="https://example.org">x</a>'):
        page.write_text(f"<html><body>{bad}</body></html>")
        with pytest.raises(AssertionError):
            assert_self_contained(page)


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    wiki = synthetic_run(root / "wiki", layers=3, heads=2, head_dim=16, seed=0, dataset="wiki")
    pydoc = synthetic_run(
        root / "pydoc", layers=3, heads=2, head_dim=16, seed=4, dataset="pydoc", keep_keys=False
    )
    out = root / "report"
    report = build_report([wiki, pydoc], out, AnalyzeConfig((0.8, 0.9)))
    return wiki, pydoc, out, report


def test_report_files_and_self_contained(two_runs):
    _, _, out, report = two_runs
    assert report.index == out / "index.html"
    assert plt.get_fignums() == []  # every figure closed
    parser = parse(report.index)
    embedded = {img["data-file"] for img in parser.images}
    pngs = {p.name for p in out.glob("*.png")}
    assert embedded == pngs == {p.name for p in report.pngs}
    assert {
        "wiki-rank-heatmap.png",
        "pydoc-per-layer-rank.png",
        "transfer-corpora.png",
        "transfer-sequences.png",
    } <= pngs
    assert all((out / name).read_bytes()[:8] == PNG_MAGIC for name in pngs)
    assert_self_contained(report.index)
    assert parser.related == []  # no validate report beside it
    text = report.index.read_text(encoding="utf-8")
    assert "pydoc: no kept key shards" in text


def test_headline_states_mean_ranks(two_runs):
    """The mean over (layer, KV head), the statistic the validate headline uses too."""
    wiki, pydoc, _, report = two_runs
    docs = {run.name: json.loads((run / "ranks.json").read_text()) for run in (wiki, pydoc)}

    def means(kind):
        return ", ".join(f"{docs[n][kind]['summary']['0.9']['mean']:.1f} ({n})" for n in docs)

    assert parse(report.index).headline == (
        f"Post-RoPE keys need a mean {means('post')} of 16 dimensions to hold 90% of their"
        f" variance; pre-RoPE keys need {means('pre')} (tiny, 3 layers × 2 KV heads)."
    )


@pytest.fixture(scope="module")
def query_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("query-runs")
    run = synthetic_query_run(root / "wiki")
    report = build_report([run], root / "report", AnalyzeConfig((0.8, 0.9)))
    return run, report


def test_headline_states_the_mean_of_each_spectrum(query_report):
    run, report = query_report
    doc = json.loads((run / "ranks.json").read_text())

    def means(kind):
        return [
            f"{doc[kind][f'{name}summary']['0.9']['mean']:.1f}" for name in ("", "query_", "score_")
        ]

    post, pre = means("post"), means("pre")
    assert parse(report.index).headline == (
        f"At τ = 90%, post-RoPE heads need on average {post[0]} of 16 dimensions for the keys'"
        f" variance, {post[1]} for the queries' energy and {post[2]} for the score energy q·k;"
        f" pre-RoPE {pre[0]}, {pre[1]} and {pre[2]} (tiny, 2 layers × 2 KV heads, 600 tokens of"
        " synthetic (test))."
    )


def test_query_report_numbers_equal_ranks_json(query_report):
    run, report = query_report
    doc = json.loads((run / "ranks.json").read_text())
    parser = assert_self_contained(report.index)
    rows = parser.table("spectra")[1:]
    assert [(r[1], r[2]) for r in rows] == [(t, k) for t in ("0.8", "0.9") for k in ("pre", "post")]
    for row in rows:
        tau, kind = row[1], row[2]
        for col, name in zip((3, 4, 5), ("summary", "query_summary", "score_summary"), strict=True):
            s = doc[kind][name][tau]
            assert row[col] == (
                f"{s['mean']:.2f} ({100 * s['mean_fraction']:.1f}%) {s['min']}–{s['max']}"
            )
        assert row[6] == f"{doc[kind]['score_range']['key_rms_max']:.3g}"
    per_head = parser.table("per-head", **{"data-run": "wiki"})
    header, body = per_head[0], per_head[1:]
    for kind in ("pre", "post"):
        for name in ("query", "score"):
            col = header.index(f"{kind} {name} rank@0.9")
            shown = [[int(r[col]) for r in body if int(r[0]) == layer] for layer in range(2)]
            assert shown == doc[kind][f"{name}_rank_at"]["0.9"]
    assert {"wiki-rank-heatmap.png", "wiki-per-layer-rank.png"} <= {p.name for p in report.pngs}
    assert plt.get_fignums() == []


def test_keys_only_runs_render_as_before(two_runs):
    text = two_runs[3].index.read_text(encoding="utf-8")
    assert 'class="spectra"' not in text and "score rank" not in text
    assert "query" not in parse(two_runs[3].index).headline


def test_per_layer_spectra_draw_each_spectrum_in_its_colour():
    rng = np.random.default_rng(1)
    ranks = {
        k: {s: rng.integers(1, 16, (5, 3)) for s in ("key", "query", "score")}
        for k in ("pre", "post")
    }
    fig = figures.per_layer_spectra(ranks, 16, 0.9, "t")
    try:
        for ax, kind in zip(fig.axes[:2], ("pre", "post"), strict=True):
            lines = {line.get_label(): line for line in ax.get_lines()}
            for spectrum, color in figures.SPECTRUM_COLORS.items():
                name = figures.SPECTRUM_TITLES[spectrum]
                line = lines[f"{name} mean"]
                assert line.get_color() == color
                np.testing.assert_allclose(line.get_ydata(), ranks[kind][spectrum].mean(axis=1))
            assert ax.get_ylim() == (0, 16)
    finally:
        plt.close(fig)


def test_small_sample_warning_only_for_one_window(two_runs, tmp_path):
    assert parse(two_runs[3].index).warnings == []
    run = synthetic_run(tmp_path / "one", layers=2, heads=2, tokens=256, window=256)
    report = build_report([run], tmp_path / "out", AnalyzeConfig((0.9,)))
    parsed = parse(report.index)
    assert parsed.warnings == [
        "Small sample: one: keys come from 1 window of 256 tokens; ranks may not hold for other"
        " text, and transfer across windows cannot be measured. Collect more with --max-tokens."
    ]
    assert "1 windows" not in report.index.read_text(encoding="utf-8")


def test_html_numbers_equal_ranks_json(two_runs):
    wiki, pydoc, _, report = two_runs
    parser = parse(report.index)
    summary = parser.table("summary")[1:]
    for run in (wiki, pydoc):
        doc = json.loads((run / "ranks.json").read_text())
        rows = [r for r in summary if r[0] == run.name]
        assert [r[1] for r in rows] == ["0.8", "0.9"]
        for row, tau in zip(rows, ("0.8", "0.9"), strict=True):
            for kind, offset in (("pre", 2), ("post", 5)):
                s = doc[kind]["summary"][tau]
                assert row[offset] == f"{s['mean']:.2f} ({100 * s['mean_fraction']:.1f}%)"
                assert row[offset + 1].split()[0] == f"{s['median']:g}"
                assert row[offset + 2] == f"{s['min']}–{s['max']}"
        per_head = parser.table("per-head", **{"data-run": run.name})
        header, body = per_head[0], per_head[1:]
        assert len(body) == doc["num_layers"] * doc["num_kv_heads"]
        for kind in ("pre", "post"):
            for tau in ("0.8", "0.9"):
                col = header.index(f"{kind} rank@{tau}")
                shown = [[int(r[col]) for r in body if int(r[0]) == layer] for layer in range(3)]
                assert shown == doc[kind]["rank_at"][tau]


def test_html_transfer_numbers_equal_computed(two_runs):
    _, _, _, report = two_runs
    rows = parse(report.index).table("transfer-corpora")
    header = rows[0]
    numbers = report.corpus_transfer.to_json()
    for row in rows[1:]:
        kind, basis, keys = row[:3]
        i, j = numbers["labels"].index(basis), numbers["labels"].index(keys)
        for col, name in enumerate(header[3:], start=3):
            assert row[col] == f"{numbers[kind][name.removeprefix('top ')][i][j]:.3f}"


def test_cli_json_numbers(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=2, heads=2, head_dim=16)
    result = runner.invoke(app, ["rank-report", str(run), "--threshold", "0.8,0.9,0.95", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    ranks = json.loads((run / "ranks.json").read_text())
    assert doc["index"] is None and ranks["thresholds"] == [0.8, 0.9, 0.95]
    assert doc["runs"][0]["pre"]["rank_at"] == ranks["pre"]["rank_at"]
    assert doc["transfer"]["sequences"][0]["halves"]["post"]["rank@0.9"] > 0.9
    result = runner.invoke(app, ["analyze", str(run), "--uncentered", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["centered"] is False


def test_cli_analyze_table(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=1, heads=1)
    result = runner.invoke(app, ["analyze", str(run)])
    assert result.exit_code == 0, result.output
    assert "mean rank" in result.stdout and (run / "calibration.safetensors").is_file()


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and " Hint: " in lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["analyze", "rank-report"])
def test_cli_missing_and_partial_run(tmp_path, command):
    assert "does not exist" in error_line(
        runner.invoke(app, [command, str(tmp_path / "nope"), "--json"])
    )
    partial = synthetic_run(tmp_path / "partial", layers=1, heads=1, state="partial")
    assert "partial" in error_line(runner.invoke(app, [command, str(partial), "--json"]))


@pytest.mark.parametrize("threshold", ["0", "1.01", "x"])
def test_cli_bad_threshold(tmp_path, threshold):
    run = synthetic_run(tmp_path / "run", layers=1, heads=1)
    line = error_line(
        runner.invoke(app, ["rank-report", str(run), "--threshold", threshold, "--json"])
    )
    assert "threshold" in line


def test_cli_too_few_tokens(tmp_path):
    keys = {k: low_rank_keys(8, 1, 1, 16, [[2]]) for k in ("pre", "post")}
    run = write_run(tmp_path / "tiny", keys)
    assert "fewer than head_dim" in error_line(runner.invoke(app, ["analyze", str(run)]))
    keys = {k: low_rank_keys(40, 1, 1, 16, [[2]]) for k in ("pre", "post")}
    run = write_run(tmp_path / "few", keys)
    result = runner.invoke(app, ["analyze", str(run), "--json"])
    assert result.exit_code == 0 and "Warning:" in result.stderr and "40 tokens" in result.stderr


def test_cli_unwritable_out(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=1, heads=1)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "cannot write the report" in error_line(
        runner.invoke(app, ["rank-report", str(run), "--out", str(blocker / "sub")])
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_cli_read_only_out(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=1, heads=1)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "cannot write the report" in error_line(
        runner.invoke(app, ["rank-report", str(run), "--out", str(locked)])
    )


def test_cli_different_models(tmp_path):
    a = synthetic_run(tmp_path / "a", layers=1, heads=1)
    b = synthetic_run(tmp_path / "b", layers=1, heads=1, model_identity="other/model@1")
    line = error_line(runner.invoke(app, ["rank-report", str(a), str(b), "--json"]))
    assert "different models" in line


# ---- reports read runs and never write into them --------------------------------------------


def test_rank_report_leaves_an_analyzed_run_byte_identical(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=2, heads=2, head_dim=16)
    analyze_and_write(run, AnalyzeConfig((0.9,)))
    before = hashes(run)
    for extra in ([], ["--threshold", "0.8,0.95"], ["--uncentered"]):
        result = runner.invoke(app, ["rank-report", str(run), "--out", str(tmp_path / "r"), *extra])
        assert result.exit_code == 0, result.output
        assert hashes(run) == before
    assert "Analyzed" not in result.stderr


def test_rank_report_on_a_stale_analysis_says_so_and_writes_nothing(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=2, heads=2, head_dim=16)
    analyze_and_write(run, AnalyzeConfig((0.9,)))
    ranks = read_ranks(run)
    ranks["moments_sha256"] = "0" * 64  # as if collect had added keys since
    write_ranks(run, {k: v for k, v in ranks.items() if k != CHECKSUM_FIELD})
    before = hashes(run)
    result = runner.invoke(app, ["rank-report", str(run), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert hashes(run) == before
    assert "does not match its moments" in result.stderr
    warnings = parse(tmp_path / "r" / "index.html").warnings
    assert len(warnings) == 1 and warnings[0].startswith("Stale analysis:")


def test_rank_report_on_an_unanalyzed_run_uses_the_analyze_writer(tmp_path, monkeypatch):
    run = synthetic_run(tmp_path / "run", layers=2, heads=2, head_dim=16)
    before = hashes(run)
    calls = []

    def spy(path, config):
        calls.append(Path(path))
        return analyze_and_write(path, config)

    monkeypatch.setattr(build, "analyze_and_write", spy)
    report = build_report([run], tmp_path / "out", AnalyzeConfig((0.9,)))
    assert calls == [run] and report.reanalyzed == [True]
    after = hashes(run)
    # analyze's writes, and the empty lock file it took (as collect leaves one)
    assert set(after) - set(before) == {"ranks.json", "calibration.safetensors", ".lock-rank0"}
    assert {k: after[k] for k in before} == before
    build_report([run], tmp_path / "again", AnalyzeConfig((0.9,)))
    assert calls == [run] and hashes(run) == after


def test_report_folder_inside_the_run_is_refused(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=1, heads=1)
    before = hashes(run)
    line = error_line(runner.invoke(app, ["rank-report", str(run), "--out", str(run / "report")]))
    assert "inside the run folder" in line
    assert hashes(run) == before


# ---- figures --------------------------------------------------------------------------------


def test_heatmap_colour_scale_spans_zero_to_head_dim():
    ranks = {"pre": np.array([[2, 3], [4, 5]]), "post": np.array([[4, 5], [6, 7]])}
    fig = figures.rank_heatmaps(ranks, 16, 0.9, "t")
    try:
        meshes = [ax.collections[0] for ax in fig.axes[:2]]
        assert [m.get_clim() for m in meshes] == [(0, 16), (0, 16)]
        colorbar = meshes[0].colorbar
        assert (colorbar.vmin, colorbar.vmax) == (0, 16)
        assert colorbar.ax.get_ylabel() == "rank@0.9 (of head_dim 16)"
    finally:
        plt.close(fig)


def test_a_head_has_one_colour_in_every_panel():
    rng = np.random.default_rng(0)
    ranks = {kind: rng.integers(1, 16, (4, 3)) for kind in ("pre", "post")}
    ratios = {kind: np.sort(rng.dirichlet(np.ones(16), (4, 3)))[..., ::-1] for kind in ranks}
    curves = head_selection(ranks, ratios)
    for draw in (figures.cumulative_curves, figures.eigen_spectra):
        fig = draw(curves, 0.9, "t") if draw is figures.cumulative_curves else draw(curves, "t")
        try:
            pre, post = (
                {line.get_label(): line.get_color() for line in ax.get_lines()}
                for ax in fig.axes[:2]
            )
            assert {c.label for c in curves} <= set(pre) and pre == post
        finally:
            plt.close(fig)
