"""The analyze stage: per (kind, layer, KV head) PCA of keys from the float64 running moments.

No second pass over the keys: the covariance is `outer/n - mean meanᵀ` (centered, the default,
as in the paper and sklearn) or the raw second moment `outer/n` (`centered=False`, the energy that
Loki's raw dot-product scores see). Eigendecomposition is `torch.linalg.eigh` in float64.

Rank at τ is the smallest r whose cumulative explained-variance ratio is ≥ τ. A cumulative ratio
exactly equal to τ counts. Cumulative sums carry float rounding of a few ulp (0.7 + 0.2 is
0.8999999999999999 in float64), so a cumulative ratio within `RANK_TOLERANCE` below τ counts too.

Writes the run's ranks and calibration files (names in `keyspace.store`; docs/run-format.md).
The ranks document is analyze's record: it holds the sha256 of the calibration file and of the
moments it was computed from, and a checksum of its own content, so readers verify both files.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace import __version__
from keyspace.calibration import Calibration, calibration_from_bytes
from keyspace.errors import FileSystemError, KeyspaceError, shell_command
from keyspace.store import CHECKSUM_FIELD as CHECKSUM_FIELD  # the ranks document's checksum
from keyspace.store import (
    DEFAULT_THRESHOLD,
    KINDS,
    RANKS,
    Moments,
    RunFolder,
    calibration_path,
    check_writable,
    ranks_path,
    read_file,
    read_verified,
    seal_problem,
    sealed,
    write_json_atomic,
)

DEFAULT_THRESHOLDS = (DEFAULT_THRESHOLD,)
# Absolute slack on cumulative ratios in [0, 1]: far above float64 rounding of a 128-term
# cumulative sum (~1e-14), far below any variance a head could meaningfully carry.
RANK_TOLERANCE = 1e-10
RANKS_FORMAT_VERSION = 1


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


def threshold_key(tau: float) -> str:
    """The JSON key of a threshold: shortest round-trip repr, e.g. 0.9 -> "0.9", 1 -> "1.0"."""
    return repr(float(tau))


@dataclass
class PCA:
    """PCA bases of one kind, components sorted by descending eigenvalue.

    mean:        (layers, kv_heads, head_dim)            zero when uncentered
    components:  (layers, kv_heads, head_dim, head_dim)  row i = i-th principal direction
    eigenvalues: (layers, kv_heads, head_dim)            descending, clamped at 0
    """

    mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor

    def __post_init__(self) -> None:
        layers, heads, dim = self.mean.shape
        if self.components.shape != (layers, heads, dim, dim) or self.eigenvalues.shape != (
            layers,
            heads,
            dim,
        ):
            raise ValueError("PCA shapes disagree")

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """(layers, kv_heads, head_dim); all zeros for a head with no variance."""
        total = self.eigenvalues.sum(dim=-1, keepdim=True)
        return torch.where(
            total > 0,
            self.eigenvalues / total.clamp_min(1e-300),
            torch.zeros_like(self.eigenvalues),
        )


def second_moment(moments: Moments, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (L, H, D), matrix (L, H, D, D)) in float64.

    Centered: the unbiased covariance, `(outer - n mean meanᵀ) / (n - 1)`, as sklearn's
    `explained_variance_`. Uncentered: `outer / n` and a zero mean.
    """
    n = moments.count.clamp_min(1.0).view(-1, 1, 1)  # (L, 1, 1)
    if not centered:
        return torch.zeros_like(moments.sum), moments.outer / n.unsqueeze(-1)
    mean = moments.sum / n  # (L, H, D)
    scatter = moments.outer - n.unsqueeze(-1) * mean.unsqueeze(-1) * mean.unsqueeze(-2)
    matrix = scatter / (n - 1).clamp_min(1.0).unsqueeze(-1)
    return mean, 0.5 * (matrix + matrix.transpose(-1, -2))


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count.

    Thousands of tiny (64 × 64) float64 problems gain nothing from threads, and a threaded batched
    `eigh` on a busy 2-core machine was measured 50× slower (1.3 s vs 0.024 s for 30 × 3 × 64²).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pca_from_moments(moments: Moments, centered: bool = True) -> PCA:
    """Eigendecomposition of each (layer, head) covariance, descending, with a fixed sign.

    The sign of each component makes its largest-magnitude entry positive, so bases are
    reproducible across runs and platforms.
    """
    mean, matrix = second_moment(moments, centered)
    with single_threaded():
        eigenvalues, vectors = torch.linalg.eigh(matrix)  # ascending; vectors: columns
    eigenvalues = eigenvalues.flip(-1).clamp_min(0.0)
    components = vectors.flip(-1).transpose(-1, -2).contiguous()  # (L, H, D, D) rows
    pivot = components.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(components, -1, pivot))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    return PCA(mean, components, eigenvalues)


def rank_at(ratios: torch.Tensor, tau: float, tolerance: float = RANK_TOLERANCE) -> torch.Tensor:
    """Smallest r with cumulative ratio ≥ τ (within `tolerance`); ratios (..., D) -> ranks (...,) int64.

    A head with no variance (all ratios zero) gets rank 0.
    """
    cumulative = ratios.to(torch.float64).cumsum(dim=-1)
    below = (cumulative < tau - tolerance).sum(dim=-1)
    ranks = (below + 1).clamp_max(ratios.shape[-1])
    return torch.where(cumulative[..., -1] > 0, ranks, torch.zeros_like(ranks))


@dataclass
class RankSummary:
    """Statistics of rank@τ over all (layer, head) of one kind."""

    mean: float
    median: float
    min: int
    max: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.min > self.max:
            raise ValueError("RankSummary needs head_dim > 0 and min <= max")

    @classmethod
    def of(cls, ranks: torch.Tensor, head_dim: int) -> RankSummary:
        """ranks: (layers, kv_heads) int."""
        flat = ranks.flatten().to(torch.float64)
        median = float(flat.quantile(0.5))  # the midpoint for an even count, as numpy
        return cls(float(flat.mean()), median, int(flat.min()), int(flat.max()), head_dim)

    def to_json(self) -> dict:
        d = self.head_dim
        return {
            "mean": self.mean,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "mean_fraction": self.mean / d,
            "median_fraction": self.median / d,
            "min_fraction": self.min / d,
            "max_fraction": self.max / d,
        }


@dataclass
class KindAnalysis:
    """PCA, ratios and ranks of one kind. ranks[τ]: (layers, kv_heads) int64."""

    pca: PCA
    ranks: dict[float, torch.Tensor]
    summary: dict[float, RankSummary]

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


def analyze_kind(moments: Moments, config: AnalyzeConfig) -> KindAnalysis:
    """PCA, ranks and summaries of one kind's moments."""
    pca = pca_from_moments(moments, centered=config.centered)
    ratios = pca.explained_variance_ratio
    head_dim = ratios.shape[-1]
    ranks = {tau: rank_at(ratios, tau) for tau in config.written_thresholds}
    summary = {tau: RankSummary.of(r, head_dim) for tau, r in ranks.items()}
    return KindAnalysis(pca, ranks, summary)


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


def corpus_label(manifest: dict) -> str:
    """Short corpus name: a named corpus with its split, or a file's last two path parts."""
    dataset = manifest.get("dataset") or {}
    spec = str(dataset.get("spec", "?"))
    if "/" in spec or spec.endswith((".txt", ".jsonl", ".parquet")):
        return "/".join(Path(spec).parts[-2:])
    split = dataset.get("split")
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
        kinds[kind] = analyze_kind(moments, config)
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
        model_spec=str((run.manifest.get("model") or {}).get("spec", "")),
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
    }
    for kind, ka in analysis.kinds.items():
        doc[kind] = {
            "rank_at": {threshold_key(t): r.tolist() for t, r in ka.ranks.items()},
            "summary": {threshold_key(t): s.to_json() for t, s in ka.summary.items()},
            "explained_variance_ratio": ka.explained_variance_ratio.tolist(),
        }
    return doc


def calibration_of(analysis: Analysis) -> Calibration:
    """The calibration file contents: float32 mean, components, eigenvalues per kind."""
    kinds = analysis.kinds
    return Calibration(
        mean={k: ka.pca.mean.float() for k, ka in kinds.items()},
        components={k: ka.pca.components.float() for k, ka in kinds.items()},
        eigenvalues={k: ka.pca.eigenvalues.float() for k, ka in kinds.items()},
        metadata={
            "model_identity": analysis.model_identity,
            "centered": "true" if analysis.config.centered else "false",
            "tokens": str(analysis.tokens),
            "keyspace_version": __version__,
        },
    )


def analyze_command(run_path: str | Path) -> str:
    return shell_command("keyspace", "analyze", run_path)


def analyze_hint(run_path: str | Path) -> str:
    return f"`{analyze_command(run_path)}` rewrites the analysis from the run's moments."


def write_ranks(run_path: str | Path, doc: dict) -> Path:
    """Seal the ranks document with its checksum and write it atomically: analyze's commit point."""
    path = ranks_path(run_path)
    write_json_atomic(path, sealed(doc))
    return path


def write_analysis(analysis: Analysis) -> tuple[Path, Path]:
    """Write the calibration, then the ranks document recording its sha256, atomically."""
    calibration_file = calibration_path(analysis.run)
    doc = {
        **ranks_json(analysis),
        "calibration_sha256": calibration_of(analysis).save(calibration_file),
    }
    return write_ranks(analysis.run, doc), calibration_file


def read_ranks(run_path: str | Path) -> dict | None:
    """The ranks document of a run, verified by its checksum; None when the run has none."""
    path, hint = ranks_path(run_path), analyze_hint(run_path)
    if not path.exists():
        return None
    try:
        doc = json.loads(read_file(path, hint))
    except ValueError as err:
        raise KeyspaceError(f"{path} is damaged: it is not valid JSON ({err}).", hint) from None
    problem = seal_problem(doc)
    if problem:
        raise KeyspaceError(f"{path} is damaged: {problem}.", hint)
    return doc


def read_calibration(run_path: str | Path, ranks: dict | None = None) -> Calibration:
    """The run's calibration, verified against the sha256 its ranks document records."""
    path, hint = calibration_path(run_path), analyze_hint(run_path)
    ranks = ranks if ranks is not None else read_ranks(run_path)
    if ranks is None:
        what = (
            "no analysis"
            if not path.exists()
            else f"a {path.name} but no {RANKS} recording its hash"
        )
        raise KeyspaceError(f"run {run_path} has {what}.", hint)
    data = read_verified(path, ranks.get("calibration_sha256"), hint)
    return calibration_from_bytes(data, path, hint)


def is_current(run_path: str | Path, config: AnalyzeConfig) -> bool:
    """True when the run's ranks and calibration files match its moments and `config`.

    Both files are verified first: a damaged one is an error, not a stale analysis.
    """
    doc = read_ranks(run_path)
    if doc is None or not calibration_path(run_path).is_file():
        return False
    read_calibration(run_path, doc)
    written = {threshold_key(t) for t in config.written_thresholds}
    return (
        doc.get("format_version") == RANKS_FORMAT_VERSION
        and doc.get("centered") == config.centered
        and written <= set(doc.get("pre", {}).get("rank_at", {}))
        and doc.get("moments_sha256") == RunFolder.open(run_path).moments_sha256
    )


def analyze_and_write(run_path: str | Path, config: AnalyzeConfig | None = None) -> Analysis:
    """analyze_run + write_analysis: what `keyspace analyze` does. The run folder is checked for
    writability before any work."""
    RunFolder.open(run_path)
    try:
        check_writable(run_path)
    except FileSystemError as err:
        copy = Path(run_path).resolve().name + "-copy"
        err.hint = f"Analyze a writable copy: `{shell_command('cp', '-r', run_path, copy)}`, then `{analyze_command(copy)}`."
        raise
    analysis = analyze_run(run_path, config)
    write_analysis(analysis)
    return analysis


def summary_json(analysis: Analysis) -> dict:
    """Compact machine summary: identity, shapes, and per kind the ranks and their statistics."""
    doc = ranks_json(analysis)
    for kind in analysis.kinds:
        doc[kind] = {
            key: value for key, value in doc[kind].items() if key != "explained_variance_ratio"
        }
    doc["run"] = str(analysis.run)
    return doc
