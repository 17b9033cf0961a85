"""The rank report's data: what `rank-report` computed, before any page is drawn."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from keyspace.analyze.pca import Analysis, summary_json
from keyspace.analyze.transfer import CorpusTransfer, SequenceTransfer


@dataclass
class Report:
    """What rank-report produced. index is None when only numbers were asked for.

    reanalyzed[i]: run i had no analysis, and keyspace.analyze.pca wrote one.
    notes: why a run's analysis on disk was not used (the page shows them, the CLI prints them).
    """

    labels: list[str]
    analyses: list[Analysis]
    corpus_transfer: CorpusTransfer | None
    sequence_transfer: list[SequenceTransfer]
    reanalyzed: list[bool]
    notes: list[str] = field(default_factory=list)
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
        return [w for a in self.analyses for w in a.warnings] + self.notes

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


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "run"
