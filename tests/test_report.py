"""rank-report: files, self-containment, HTML numbers equal ranks.json, and the CLI's errors."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from runfolder_fixtures import low_rank_keys, synthetic_run, write_run
from typer.testing import CliRunner

from keyspace.analyze import AnalyzeConfig
from keyspace.cli.main import app
from keyspace.reports.build import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


class Tables(HTMLParser):
    """Collect every table (by class) as rows of cell texts, and every <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[dict, list[list[str]]]] = []
        self.images: list[dict] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append((attrs, []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

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
    assert all(img["src"].startswith("data:image/png;base64,") for img in parser.images)
    assert all((out / name).read_bytes()[:8] == PNG_MAGIC for name in pngs)
    text = report.index.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "pydoc: no kept key shards" in text


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
