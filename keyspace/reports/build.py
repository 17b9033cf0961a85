"""The rank report: read runs, measure transfer, and assemble index.html (rank_page.py).

Compute happens in keyspace.analyze.pca / keyspace.analyze.transfer. A report reads its runs and never
writes into them: a run that was never analyzed gets its analysis from keyspace.analyze.pca's own
writer (what `keyspace analyze` does); one analyzed with other settings, or whose moments
changed since, is analyzed in memory, and the report says so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from keyspace.analyze.pca import Analysis, AnalyzeConfig, analyze_and_write, analyze_run, is_current
from keyspace.analyze.transfer import (
    across_corpora,
    across_sequences,
    require_same_model,
)
from keyspace.errors import KeyspaceError
from keyspace.reports import links
from keyspace.reports.rank_page import rank_page
from keyspace.reports.rank_report import Report
from keyspace.runfolder.analysis import read_ranks
from keyspace.runfolder.files import write_text_atomic
from keyspace.runfolder.store import DEFAULT_THRESHOLD, RunFolder, calibration_path


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique labels: the folder name, or parent/name where names collide."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    labels = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return labels if len(set(labels)) == len(labels) else [f"{i}:{n}" for i, n in enumerate(names)]


def prepare_out(out: Path, runs: list[Path] = ()) -> Path:
    """Create --out and prove it is writable, before any compute. It may not lie in a run."""
    resolved = out.resolve()
    for run in runs:
        if resolved == run.resolve() or run.resolve() in resolved.parents:
            raise KeyspaceError(
                f"the report folder {out} is inside the run folder {run}; reports never write into a run.",
                f"Pass another folder with --out, e.g. --out reports/{run.resolve().name}.",
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".keyspace-write-test.", dir=out)  # follows no link
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise KeyspaceError(
            f"cannot write the report to {out} ({err.strerror or err}).",
            "Pass a writable folder with --out.",
        ) from None
    return out


def load_analysis(path: Path, config: AnalyzeConfig) -> tuple[Analysis, bool, str | None]:
    """(analysis, whether keyspace.analyze.pca wrote it now, a note when the one on disk was not used)."""
    written = read_ranks(path)
    if written is None or not calibration_path(path).is_file():
        return analyze_and_write(path, config), True, None
    if is_current(path, config):
        return analyze_run(path, config), False, None
    on_disk = AnalyzeConfig((DEFAULT_THRESHOLD,), centered=bool(written.get("centered", True)))
    if is_current(path, on_disk):  # only the thresholds or centering asked for differ
        return analyze_run(path, config), False, None
    note = (
        f"the analysis in {path} does not match its moments (collected further since?); this"
        f" report computed ranks afresh. Run `keyspace analyze {path}` to update the run."
    )
    return analyze_run(path, config), False, note


def build_report(run_paths: list[str | Path], out: Path | None, config: AnalyzeConfig) -> Report:
    """Analyze every run, measure transfer, and (when `out` is given) write index.html + PNGs."""
    paths = [Path(p) for p in run_paths]
    if not paths:
        raise KeyspaceError(
            "no run folder given.", "Pass one or more run folders written by `keyspace collect`."
        )
    if out is not None:
        prepare_out(out, paths)
    runs = [RunFolder.open(p).require_complete() for p in paths]
    require_same_model(runs)
    labels = run_labels(paths)
    loaded = [load_analysis(p, config) for p in paths]
    corpora = across_corpora(paths, labels, config.centered) if len(paths) > 1 else None
    sequences = [
        across_sequences(p, label, config.centered) for p, label in zip(paths, labels, strict=True)
    ]
    report = Report(
        labels,
        [a for a, _, _ in loaded],
        corpora,
        sequences,
        [wrote for _, wrote, _ in loaded],
        [note for _, _, note in loaded if note],
    )
    if out is not None:
        render(report, out)
    return report


def render(report: Report, out: Path) -> Path:
    """Write the PNGs and index.html into `out` (created if needed); link a sibling validate page."""
    prepare_out(out, [a.run for a in report.analyses])
    text, pngs = rank_page(report, links.rank_page_links(out))
    report.pngs = [png.write(out) for png in pngs]
    index = out / links.RANK_PAGE
    write_text_atomic(index, text)
    report.index = index
    return index
