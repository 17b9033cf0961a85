"""The analyze stage: per (kind, layer, KV head) PCA of keys from the float64 running moments.

No second pass over the keys: the covariance is `outer/n - mean meanᵀ` (centered, the default,
as in the paper and sklearn) or the raw second moment `outer/n` (`centered=False`, the energy that
Loki's raw dot-product scores see). Eigendecomposition is `torch.linalg.eigh` in float64.

Rank at τ is the smallest r whose cumulative explained-variance ratio is ≥ τ. A cumulative ratio
exactly equal to τ counts. Cumulative sums carry float rounding of a few ulp (0.7 + 0.2 is
0.8999999999999999 in float64), so a cumulative ratio within `RANK_TOLERANCE` below τ counts too.

Writes the run's ranks and calibration files (names in `keyspace.runfolder.store`; docs/run-format.md).
The ranks document is analyze's record: it holds the sha256 of the calibration file and of the
moments it was computed from, and a checksum of its own content, so readers verify both files.
Writing them is one commit (`write_analysis`), under the run folder's lock: Ctrl-C at any point
leaves the old analysis or the new one, never a mismatched pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace import __version__
from keyspace.analyze.spectra import (
    PCA,
    QUERY_EIGEN_FLOOR,
    RANK_TOLERANCE,
    RankSummary,
    ScoreSpectrum,
    SpectrumRanks,
    pca_from_moments,
    score_spectrum,
    threshold_key,
)
from keyspace.errors import FileSystemError, KeyspaceError, shell_command
from keyspace.runfolder.analysis import (
    analyze_command,
    commit_analysis,
    committed_calibration_path,
    read_calibration,
    read_ranks,
)
from keyspace.runfolder.calibration import Calibration
from keyspace.runfolder.lock import FolderLock
from keyspace.runfolder.manifest import Manifest
from keyspace.runfolder.store import (
    DEFAULT_THRESHOLD,
    KINDS,
    Moments,
    RunFolder,
    check_writable,
    ranks_path,
    sealed,
    write_json_atomic,
)

DEFAULT_THRESHOLDS = (DEFAULT_THRESHOLD,)
RANKS_FORMAT_VERSION = 1
FP16_MAX = 65504.0


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to compute: thresholds τ in (0, 1] and centered (covariance) vs raw second moment."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    centered: bool = True

    def __post_init__(self) -> None:
        if not self.thresholds:
            raise KeyspaceError("no threshold given.", "Pass e.g. --threshold 0.9 or 0.8,0.9,0.95.")
        for tau in self.thresholds:
            if not (isinstance(tau, (int, float)) and math.isfinite(tau) and 0.0 < tau <= 1.0):
                raise KeyspaceError(
                    f"threshold {tau!r} is outside (0, 1].",
                    "Thresholds are explained-variance fractions, e.g. 0.9 for 90%.",
                )
        ordered = tuple(sorted(set(float(t) for t in self.thresholds)))
        object.__setattr__(self, "thresholds", ordered)

    @property
    def written_thresholds(self) -> tuple[float, ...]:
        """Thresholds written to the ranks file: the requested ones plus DEFAULT_THRESHOLD, which
        validate reads."""
        return tuple(sorted(set(self.thresholds) | {DEFAULT_THRESHOLD}))


def parse_thresholds(text: str) -> tuple[float, ...]:
    """Parse "0.8,0.9,0.95" into floats; a bad item raises KeyspaceError."""
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(float(item))
        except ValueError:
            raise KeyspaceError(
                f"threshold {item!r} is not a number.",
                "Use a comma-separated list such as 0.8,0.9,0.95.",
            ) from None
    return AnalyzeConfig(tuple(values)).thresholds


@dataclass
class KindAnalysis:
    """PCA, ratios and ranks of one kind. ranks[τ]: (layers, kv_heads) int64.

    With query moments also the score spectrum and its transforms (`scores`), and the rank@τ of
    the query spectrum (`query`) and of the score spectrum (`score`); None for keys-only runs.
    """

    pca: PCA
    ranks: dict[float, torch.Tensor]
    summary: dict[float, RankSummary]
    scores: ScoreSpectrum | None = None
    query: SpectrumRanks | None = None
    score: SpectrumRanks | None = None

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        return self.pca.explained_variance_ratio


@dataclass
class Analysis:
    """Everything `analyze` computed for one run; `kinds` maps "pre"/"post" to its KindAnalysis."""

    run: Path
    model_identity: str
    corpus: str
    tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    config: AnalyzeConfig
    kinds: dict[str, KindAnalysis]
    moments_sha256: str = ""
    warnings: list[str] = field(default_factory=list)
    model_spec: str = ""

    def __post_init__(self) -> None:
        for kind, ka in self.kinds.items():
            if ka.pca.mean.shape != (self.num_layers, self.num_kv_heads, self.head_dim):
                raise ValueError(f"{kind}: PCA shape does not match the run's shape")

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.config.written_thresholds

    @property
    def has_queries(self) -> bool:
        """Whether the run recorded queries: query and score spectra and the query-aware basis."""
        return all(ka.scores is not None for ka in self.kinds.values())


def analyze_kind(
    moments: Moments, config: AnalyzeConfig, queries: Moments | None = None
) -> KindAnalysis:
    """PCA, ranks and summaries of one kind's moments; with its queries' moments also the query
    and score spectra."""
    pca = pca_from_moments(moments, centered=config.centered)
    taus = config.written_thresholds
    keys = SpectrumRanks.of(pca.explained_variance_ratio, taus)
    if queries is None:
        return KindAnalysis(pca, keys.ranks, keys.summary)
    scores = score_spectrum(moments, queries)
    query, score = (SpectrumRanks.of(r, taus) for r in (scores.query_ratio, scores.score_ratio))
    return KindAnalysis(pca, keys.ranks, keys.summary, scores, query, score)


def token_warnings(tokens: int, head_dim: int, run: Path) -> list[str]:
    """Refuse fewer tokens than head_dim (a rank-deficient covariance); warn below 10 × head_dim."""
    if tokens < head_dim:
        raise KeyspaceError(
            f"run {run} has {tokens} tokens, fewer than head_dim={head_dim}: the PCA would be rank-deficient.",
            f"Collect at least {10 * head_dim} tokens (--max-tokens).",
        )
    if tokens < 10 * head_dim:
        return [
            f"run {run} has only {tokens} tokens (< 10 × head_dim = {10 * head_dim}); ranks may be unstable."
        ]
    return []


def corpus_label(manifest: Manifest) -> str:
    """Short corpus name: a named corpus with its split, or a file's last two path parts."""
    spec = manifest.dataset_spec or "?"
    if "/" in spec or spec.endswith((".txt", ".jsonl", ".parquet")):
        return "/".join(Path(spec).parts[-2:])
    split = manifest.dataset_split
    return f"{spec} ({split})" if split else spec


def analyze_run(run_path: str | Path, config: AnalyzeConfig | None = None) -> Analysis:
    """Analyze a complete run folder from its moments. Pure: writes nothing (see `write_analysis`)."""
    config = config or AnalyzeConfig()
    run = RunFolder.open(run_path).require_complete()
    layers, heads, head_dim = run.shape
    kinds: dict[str, KindAnalysis] = {}
    counts = []
    for kind in KINDS:
        moments = run.moments(kind)  # verified against the manifest, shape checked
        counts.append(int(moments.count.min()))
        kinds[kind] = analyze_kind(moments, config, run.query_moments(kind))
    tokens = min(counts)
    warnings = token_warnings(tokens, head_dim, run.path)
    return Analysis(
        run=run.path,
        model_identity=run.model_identity,
        corpus=corpus_label(run.manifest),
        tokens=tokens,
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        config=config,
        kinds=kinds,
        moments_sha256=run.moments_sha256 or "",
        warnings=warnings,
        model_spec=run.manifest.model_spec or "",
    )


def ranks_json(analysis: Analysis) -> dict:
    """The ranks document (docs/run-format.md)."""

    doc: dict = {
        "format_version": RANKS_FORMAT_VERSION,
        "keyspace_version": __version__,
        "model_identity": analysis.model_identity,
        "model_spec": analysis.model_spec,
        "corpus": analysis.corpus,
        "tokens": analysis.tokens,
        "head_dim": analysis.head_dim,
        "num_layers": analysis.num_layers,
        "num_kv_heads": analysis.num_kv_heads,
        "thresholds": list(analysis.thresholds),
        "centered": analysis.config.centered,
        "rank_tolerance": RANK_TOLERANCE,
        "moments_sha256": analysis.moments_sha256,
        "queries": analysis.has_queries,
    }
    if analysis.has_queries:
        doc["query_eigen_floor"] = QUERY_EIGEN_FLOOR
    for kind, ka in analysis.kinds.items():
        doc[kind] = {
            "rank_at": {threshold_key(t): r.tolist() for t, r in ka.ranks.items()},
            "summary": {threshold_key(t): s.to_json() for t, s in ka.summary.items()},
            "explained_variance_ratio": ka.explained_variance_ratio.tolist(),
        }
        if ka.scores is not None:
            doc[kind] |= query_json(ka)
    return doc


def query_json(ka: KindAnalysis) -> dict:
    """A kind's query and score spectra for the ranks document, and the transformed range."""
    doc = {}
    for name, spectrum in (("query", ka.query), ("score", ka.score)):
        doc[f"{name}_rank_at"] = {threshold_key(t): r.tolist() for t, r in spectrum.ranks.items()}
        doc[f"{name}_summary"] = {
            threshold_key(t): s.to_json() for t, s in spectrum.summary.items()
        }
        doc[f"{name}_explained_variance_ratio"] = spectrum.ratios.tolist()
    key_rms, query_rms = (x.amax(dim=-1) for x in (ka.scores.key_rms, ka.scores.query_rms))
    top = float(key_rms.max())
    return doc | {
        "score_key_rms_max": key_rms.tolist(),
        "score_query_rms_max": query_rms.tolist(),
        "query_eigen_clamped": ka.scores.clamped.tolist(),
        "score_range": {
            "key_rms_max": top,
            "query_rms_max": float(query_rms.max()),
            "key_fp16_headroom": FP16_MAX / top if top > 0 else None,
        },
    }


def calibration_of(analysis: Analysis) -> Calibration:
    """The calibration file contents: float32 mean, components, eigenvalues per kind, and with
    queries the query-aware transforms and the score spectrum."""
    kinds = analysis.kinds
    scores = {k: ka.scores for k, ka in kinds.items() if ka.scores is not None}
    return Calibration(
        mean={k: ka.pca.mean.float() for k, ka in kinds.items()},
        components={k: ka.pca.components.float() for k, ka in kinds.items()},
        eigenvalues={k: ka.pca.eigenvalues.float() for k, ka in kinds.items()},
        metadata={
            "model_identity": analysis.model_identity,
            "centered": "true" if analysis.config.centered else "false",
            "tokens": str(analysis.tokens),
            "keyspace_version": __version__,
            "queries": "true" if scores else "false",
            **({"query_eigen_floor": repr(QUERY_EIGEN_FLOOR)} if scores else {}),
        },
        score_key_transform={k: s.key_transform.float() for k, s in scores.items()},
        score_query_transform={k: s.query_transform.float() for k, s in scores.items()},
        score_eigenvalues={k: s.eigenvalues.float() for k, s in scores.items()},
    )


def write_ranks(run_path: str | Path, doc: dict) -> Path:
    """Seal the ranks document with its checksum and write it atomically: analyze's commit point."""
    path = ranks_path(run_path)
    write_json_atomic(path, sealed(doc))
    return path


def write_analysis(analysis: Analysis) -> tuple[Path, Path]:
    """Write the calibration and the ranks document recording its sha256, as one commit
    (`keyspace.runfolder.analysis.commit_analysis`). The caller holds the folder lock
    (`analyze_and_write`). A NaN or Inf in the results is refused before anything is written."""
    calibration = calibration_of(analysis)
    where = calibration.first_nonfinite()
    if where is not None:
        raise KeyspaceError(
            f"analyze computed a NaN or Inf from the moments of {analysis.run} ({where}); nothing"
            " was written.",
            "Collect the run again: its moments hold values no PCA can use.",
        )
    doc = ranks_json(analysis)
    return commit_analysis(analysis.run, calibration.to_bytes(), doc)


def is_current(run_path: str | Path, config: AnalyzeConfig) -> bool:
    """True when the run's ranks and calibration files match its moments and `config`.

    Both files are verified first: a damaged one is an error, not a stale analysis.
    """
    doc = read_ranks(run_path)
    if doc is None or not committed_calibration_path(run_path, doc).is_file():
        return False
    read_calibration(run_path, doc)
    run = RunFolder.open(run_path)
    written = {threshold_key(t) for t in config.written_thresholds}
    return (
        doc.get("format_version") == RANKS_FORMAT_VERSION
        and doc.get("centered") == config.centered
        and written <= set(doc["pre"]["rank_at"])
        and doc.get("moments_sha256") == run.moments_sha256
        and doc.get("queries", False) == ("queries" in run.manifest.capture)
    )


def analyze_and_write(run_path: str | Path, config: AnalyzeConfig | None = None) -> Analysis:
    """analyze_run + write_analysis: what `keyspace analyze` does, under the run folder's lock (a
    second analyze, or a collect still writing, is refused). The run folder is checked for
    writability before any work."""
    RunFolder.open(run_path)
    try:
        check_writable(run_path)
    except FileSystemError as err:
        copy = Path(run_path).resolve().name + "-copy"
        err.hint = f"Analyze a writable copy: `{shell_command('cp', '-r', run_path, copy)}`, then `{analyze_command(copy)}`."
        raise
    busy = (
        f"another keyspace process (analyze or collect) is writing to {Path(run_path)}.",
        f"Wait for it to finish, then run `{analyze_command(run_path)}` again.",
    )
    with FolderLock(Path(run_path), 0, busy=busy):
        analysis = analyze_run(run_path, config)
        write_analysis(analysis)
    return analysis


def summary_json(analysis: Analysis) -> dict:
    """Compact machine summary: identity, shapes, and per kind the ranks and their statistics."""
    doc = ranks_json(analysis)
    for kind in analysis.kinds:
        doc[kind] = {
            key: value
            for key, value in doc[kind].items()
            if not key.endswith("explained_variance_ratio")
        }
    doc["run"] = str(analysis.run)
    return doc
