"""Eigen-spectra from float64 moments: the keys' PCA, the queries' second moment, and the score
spectrum with its query-aware transforms. Moments in, tensors out; no files.

Score spectrum (docs/analysis.md). For one KV head let C_k be the centered key covariance and
S_q = E[q qᵀ] the uncentered second moment of its group's queries. With U the eigenvectors of
S_q^½ C_k S_q^½ in descending order, the key transform A = Uᵀ S_q^½ and the query transform
B = Uᵀ S_q^-½ = A⁻ᵀ give q̃·k̃ = (Bq)·(Ak) = q·k exactly, and the first d coordinates hold the
most score energy E[(q·(k − μ))²] any rank-d bilinear approximation can (Eckart–Young on
S_q^½ C_k^½). The key mean μ adds the same constant to every score of a query row, so it never
changes which keys a row selects: C_k is centered whatever the key PCA's `centered` setting.

S_q is regularized: its eigenvalues below `QUERY_EIGEN_FLOOR` × its largest are raised to that
floor. Exactness holds for any positive-definite S_q, so the floor never changes a score; it
bounds the condition number of S_q^½ by 1/√floor = 1e3, so A and B stored in float32 keep q̃·k̃
within about 1e3 × 2⁻²⁴ ≈ 6e-5 (relative) of q·k. Directions below 1e-6 of the largest carry no
measurable query energy (queries are float32 or lower precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from keyspace.runfolder.store import Moments

# Absolute slack on cumulative ratios in [0, 1]: far above float64 rounding of a 128-term
# cumulative sum (~1e-14), far below any variance a head could meaningfully carry.
RANK_TOLERANCE = 1e-10
# S_q's eigenvalues are clamped at this fraction of its largest (module docstring says why).
QUERY_EIGEN_FLOOR = 1e-6


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
        return ratios_of(self.eigenvalues)


def ratios_of(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (..., D) as fractions of their sum; all zeros where the sum is zero."""
    total = eigenvalues.sum(dim=-1, keepdim=True)
    return torch.where(
        total > 0, eigenvalues / total.clamp_min(1e-300), torch.zeros_like(eigenvalues)
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


def descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues (..., D) descending and clamped at 0, eigenvectors as rows (..., D, D)).

    The sign of each row makes its largest-magnitude entry positive, so bases are reproducible
    across runs and platforms.
    """
    with single_threaded():
        eigenvalues, vectors = torch.linalg.eigh(matrix)  # ascending; vectors: columns
    eigenvalues = eigenvalues.flip(-1).clamp_min(0.0)
    rows = vectors.flip(-1).transpose(-1, -2).contiguous()
    pivot = rows.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(rows, -1, pivot))
    return eigenvalues, rows * torch.where(signs == 0, torch.ones_like(signs), signs)


def pca_from_moments(moments: Moments, centered: bool = True) -> PCA:
    """Eigendecomposition of each (layer, head) covariance, descending, with a fixed sign."""
    mean, matrix = second_moment(moments, centered)
    eigenvalues, components = descending_eigh(matrix)
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


def threshold_key(tau: float) -> str:
    """The JSON key of a threshold: shortest round-trip repr, e.g. 0.9 -> "0.9", 1 -> "1.0"."""
    return repr(float(tau))


@dataclass
class SpectrumRanks:
    """rank@τ of one spectrum over all (layer, head): ratios (L, H, D); ranks[τ]: (L, H) int64."""

    ratios: torch.Tensor
    ranks: dict[float, torch.Tensor]
    summary: dict[float, RankSummary]

    @classmethod
    def of(cls, ratios: torch.Tensor, thresholds: tuple[float, ...]) -> SpectrumRanks:
        ranks = {tau: rank_at(ratios, tau) for tau in thresholds}
        head_dim = ratios.shape[-1]
        return cls(ratios, ranks, {tau: RankSummary.of(r, head_dim) for tau, r in ranks.items()})


@dataclass
class ScoreSpectrum:
    """The query and score spectra of one kind, and the query-aware transforms.

    query_eigenvalues: (L, H, D)     eigenvalues of S_q, descending (before the floor)
    eigenvalues:       (L, H, D)     eigenvalues of S_q^½ C_k S_q^½, descending: score energy
    key_transform:     (L, H, D, D)  A; k̃ = A k (rows are output coordinates)
    query_transform:   (L, H, D, D)  B = A⁻ᵀ; q̃ = B q
    key_rms:           (L, H, D)     RMS of each k̃ coordinate over the calibration keys:
                                     sqrt(diag(A (C_k + μμᵀ) Aᵀ))
    query_rms:         (L, H, D)     RMS of each q̃ coordinate: sqrt(diag(B S_q Bᵀ)), 1 where
                                     S_q's eigenvalues are above the floor
    clamped:           (L, H)        how many of S_q's eigenvalues the floor raised
    """

    query_eigenvalues: torch.Tensor
    eigenvalues: torch.Tensor
    key_transform: torch.Tensor
    query_transform: torch.Tensor
    key_rms: torch.Tensor
    query_rms: torch.Tensor
    clamped: torch.Tensor
    floor: float = QUERY_EIGEN_FLOOR

    @property
    def query_ratio(self) -> torch.Tensor:
        """(L, H, D) S_q's eigenvalues as fractions of the queries' total energy."""
        return ratios_of(self.query_eigenvalues)

    @property
    def score_ratio(self) -> torch.Tensor:
        """(L, H, D) the score energy's fraction in each query-aware coordinate."""
        return ratios_of(self.eigenvalues)


def _diag(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """diag(X M Xᵀ) for batches: (..., D, D), (..., D, D) -> (..., D)."""
    return torch.einsum("...ij,...jk,...ik->...i", x, matrix, x)


def score_spectrum(
    keys: Moments, queries: Moments, floor: float = QUERY_EIGEN_FLOOR
) -> ScoreSpectrum:
    """The score spectrum of one kind from its key moments and its pooled query moments."""
    mean, key_cov = second_moment(keys, centered=True)
    _, s_q = second_moment(queries, centered=False)
    with single_threaded():
        raw, vectors = torch.linalg.eigh(s_q)  # ascending; vectors: columns
    top = raw.amax(dim=-1, keepdim=True)
    clamped = (raw < floor * top).sum(dim=-1)
    # A head whose queries are all zero has no preferred direction: S_q = I, the key PCA.
    lam = torch.where(top > 0, torch.maximum(raw, floor * top), torch.ones_like(raw))
    root = (vectors * lam.sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)  # S_q^½
    inv_root = (vectors * lam.rsqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)  # S_q^-½
    whitened = root @ key_cov @ root
    eigenvalues, u_rows = descending_eigh(0.5 * (whitened + whitened.transpose(-1, -2)))
    key_transform = u_rows @ root  # A = Uᵀ S_q^½
    query_transform = u_rows @ inv_root  # B = Uᵀ S_q^-½ = A⁻ᵀ
    key_second = key_cov + mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return ScoreSpectrum(
        query_eigenvalues=raw.flip(-1).clamp_min(0.0),
        eigenvalues=eigenvalues,
        key_transform=key_transform,
        query_transform=query_transform,
        key_rms=_diag(key_transform, key_second).clamp_min(0.0).sqrt(),
        query_rms=_diag(query_transform, s_q).clamp_min(0.0).sqrt(),
        clamped=clamped,
        floor=floor,
    )
