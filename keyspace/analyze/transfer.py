"""Calibration transfer: does a PCA basis fitted on one set of keys capture another set's variance?

The captured fraction of basis A's top-r components on keys B is
`trace(U_r C_B U_rᵀ) / trace(C_B)`, with U_r: (r, D) the rows of A's components and C_B the
covariance of B about B's own mean (centered) or B's raw second moment (uncentered), the same
mode as the analysis. It is 1 at r = D and, on A itself, equals A's cumulative explained ratio.

- Across corpora: runs of one model on different corpora, from their moments only.
- Across sequences: within one run, from kept key shards. Fit on the first half of the kept keys
  (in stored order), measure on the second half; and fit on each window, measure on the others.

r is A's own rank@0.9 per head, or a fixed r in {D/8, D/4, D/2}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace.analyze.spectra import PCA, pca_from_moments, rank_at, second_moment, single_threaded
from keyspace.errors import KeyspaceError
from keyspace.runfolder.store import KINDS, Moments, RunFolder

RANK_SPEC = "rank@0.9"
TRANSFER_THRESHOLD = 0.9
# Windows with fewer kept keys than this many × head_dim are too small to fit a basis on.
MIN_FIT_TOKENS_PER_DIM = 1


def r_specs(head_dim: int) -> tuple[str, ...]:
    """Column names: A's own rank@0.9 per head, then fixed r = D/8, D/4, D/2."""
    return (RANK_SPEC, *(f"r={r}" for r in fixed_ranks(head_dim)))


def fixed_ranks(head_dim: int) -> tuple[int, ...]:
    return tuple(max(1, head_dim // div) for div in (8, 4, 2))


def captured_curve(components: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Fraction of `matrix`'s trace captured by the top-r rows of `components`, for r = 1..D.

    components: (L, H, D, D) rows sorted by descending eigenvalue of the fitted keys.
    matrix:     (L, H, D, D) covariance (or second moment) of the evaluated keys.
    Returns (L, H, D); entry r-1 is the fraction for the top r. Zero-variance heads give zeros.
    """
    per_component = torch.einsum("lhid,lhde,lhie->lhi", components, matrix, components)
    total = torch.diagonal(matrix, dim1=-2, dim2=-1).sum(-1, keepdim=True)  # (L, H, 1)
    curve = per_component.cumsum(-1) / total.clamp_min(1e-300)
    return torch.where(total > 0, curve, torch.zeros_like(curve))


def select_r(curve: torch.Tensor, fit: PCA) -> dict[str, torch.Tensor]:
    """Pick each r spec from a captured curve (L, H, D) -> {spec: (L, H) float64}."""
    head_dim = curve.shape[-1]
    own_rank = rank_at(fit.explained_variance_ratio, TRANSFER_THRESHOLD).clamp_min(1)  # (L, H)
    picked = {RANK_SPEC: torch.gather(curve, -1, (own_rank - 1).unsqueeze(-1)).squeeze(-1)}
    for r in fixed_ranks(head_dim):
        picked[f"r={r}"] = curve[..., r - 1]
    return picked


def transfer_fraction(fit: PCA, evaluated: Moments, centered: bool) -> dict[str, torch.Tensor]:
    """Fraction of `evaluated`'s variance captured by `fit`'s top-r, per r spec: {spec: (L, H)}."""
    _, matrix = second_moment(evaluated, centered)
    return select_r(captured_curve(fit.components, matrix), fit)


@dataclass
class CorpusTransfer:
    """Cross-corpus transfer. per_head[kind][spec]: (runs, runs, L, H), row = basis, column = keys."""

    labels: list[str]
    head_dim: int
    per_head: dict[str, dict[str, torch.Tensor]]

    def __post_init__(self) -> None:
        n = len(self.labels)
        for kind, specs in self.per_head.items():
            for spec, t in specs.items():
                if t.shape[:2] != (n, n):
                    raise ValueError(f"{kind}/{spec}: matrix must be ({n}, {n}, L, H)")

    def matrix(self, kind: str, spec: str) -> torch.Tensor:
        """(runs, runs): mean over layers and heads of the captured fraction."""
        return self.per_head[kind][spec].mean(dim=(-2, -1))

    def to_json(self) -> dict:
        return {
            "labels": self.labels,
            "row": "basis fitted on this run",
            "column": "keys whose variance is measured",
            **{
                kind: {spec: self.matrix(kind, spec).tolist() for spec in specs}
                for kind, specs in self.per_head.items()
            },
        }


def require_same_model(runs: list[RunFolder]) -> None:
    """Refuse to compare runs of different models or shapes."""
    first = runs[0]
    for other in runs[1:]:
        if other.model_identity != first.model_identity or other.shape != first.shape:
            raise KeyspaceError(
                f"runs {first.path} ({first.model_identity}, shape {first.shape}) and {other.path} "
                f"({other.model_identity}, shape {other.shape}) are of different models.",
                "Compare runs of the same model only; report other models separately.",
            )


def across_corpora(
    run_paths: list[str | Path], labels: list[str], centered: bool = True
) -> CorpusTransfer:
    """Every run's basis on every run's keys, per kind, from the moments."""
    with single_threaded():
        return _across_corpora(run_paths, labels, centered)


def _across_corpora(
    run_paths: list[str | Path], labels: list[str], centered: bool
) -> CorpusTransfer:
    runs = [RunFolder.open(p).require_complete() for p in run_paths]
    require_same_model(runs)
    head_dim = runs[0].shape[2]
    per_head: dict[str, dict[str, torch.Tensor]] = {}
    for kind in KINDS:
        moments = [run.moments(kind) for run in runs]
        fits = [pca_from_moments(m, centered) for m in moments]
        rows = [[transfer_fraction(fit, m, centered) for m in moments] for fit in fits]
        per_head[kind] = {
            spec: torch.stack([torch.stack([cell[spec] for cell in row]) for row in rows])
            for spec in r_specs(head_dim)
        }
    require_finite(per_head, "across corpora", runs[0].path)
    return CorpusTransfer(labels, head_dim, per_head)


def require_finite(tables: dict, what: str, run: Path) -> None:
    """Refuse a NaN or Inf in transfer results ({kind: {spec: tensor}}, nested any depth): its
    inputs are checked finite when read, so one here means values too large for float64."""
    for name, value in tables.items():
        if isinstance(value, dict):
            require_finite(value, f"{what}, {name}", run)
        elif not bool(torch.isfinite(value).all()):
            raise KeyspaceError(
                f"the transfer {what}, {name} of {run} is not finite (NaN or Inf): its keys are"
                " too large to measure in float64.",
                "Collect the run again; a model whose keys overflow cannot be analyzed.",
            )


def moments_of(keys: torch.Tensor) -> Moments:
    """Moments of one layer's keys (N, H, D), as a 1-layer Moments."""
    _, heads, dim = keys.shape
    m = Moments.zeros(1, heads, dim)
    m.add_keys(0, keys)
    return m


@dataclass
class SequenceTransfer:
    """Within-run transfer. per_layer[test][kind][spec]: (L, H) captured fraction.

    tests: "halves" (fit first half, measure second), "windows" (fit one window, measure the
    rest, averaged over windows) and "random" (the control for "windows": fit a random subset of
    the same size as each window, measure the rest). `notes` says why a test is missing.
    """

    label: str
    head_dim: int
    per_layer: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    windows_used: int = 0

    def mean(self, test: str, kind: str, spec: str) -> float:
        return float(self.per_layer[test][kind][spec].mean())

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "windows_used": self.windows_used,
            "notes": self.notes,
            **{
                test: {
                    kind: {spec: self.mean(test, kind, spec) for spec in specs}
                    for kind, specs in kinds.items()
                }
                for test, kinds in self.per_layer.items()
            },
        }


def halves_fraction(keys: torch.Tensor, centered: bool) -> dict[str, torch.Tensor]:
    """Fit on keys[:N//2], measure on keys[N//2:]; keys (N, H, D) -> {spec: (1, H)}."""
    half = keys.shape[0] // 2
    return transfer_fraction(
        pca_from_moments(moments_of(keys[:half]), centered), moments_of(keys[half:]), centered
    )


def masked_fraction(
    keys: torch.Tensor, masks: list[torch.Tensor], centered: bool
) -> dict[str, torch.Tensor]:
    """Mean over masks of: fit on keys[mask], measure on keys[~mask]. keys (N, H, D), masks (N,) bool."""
    results = []
    for inside in masks:
        fit = pca_from_moments(moments_of(keys[inside]), centered)
        results.append(transfer_fraction(fit, moments_of(keys[~inside]), centered))
    return {spec: torch.stack([r[spec] for r in results]).mean(0) for spec in results[0]}


def random_masks_like(masks: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Random token subsets of the same sizes as `masks`: the sample-size control for windows."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for mask in masks:
        chosen = torch.zeros_like(mask)
        chosen[torch.randperm(mask.shape[0], generator=gen)[: int(mask.sum())]] = True
        out.append(chosen)
    return out


def fit_windows_of(windows: torch.Tensor, head_dim: int, max_windows: int) -> list[int]:
    """Windows with enough kept keys to fit a basis on, at most `max_windows` of them."""
    ids, counts = torch.unique(windows, return_counts=True)
    big = [
        int(w) for w, c in zip(ids, counts, strict=True) if c >= MIN_FIT_TOKENS_PER_DIM * head_dim
    ]
    return big[:max_windows] if len(ids) >= 2 else []


def across_sequences(
    run_path: str | Path, label: str, centered: bool = True, max_windows: int = 8
) -> SequenceTransfer:
    """Halves and one-window-vs-rest transfer from a run's kept keys; notes when impossible."""
    with single_threaded():
        return _across_sequences(run_path, label, centered, max_windows)


def _across_sequences(
    run_path: str | Path, label: str, centered: bool, max_windows: int
) -> SequenceTransfer:
    run = RunFolder.open(run_path).require_complete()
    layers, _, head_dim = run.shape
    result = SequenceTransfer(label, head_dim)
    if not run.has_kept_keys:
        result.notes.append(
            f"{label}: no kept key shards; collect with --keep-keys to measure transfer across sequences."
        )
        return result
    halves: dict[str, list] = {k: [] for k in KINDS}
    per_window: dict[str, list] = {k: [] for k in KINDS}
    control: dict[str, list] = {k: [] for k in KINDS}
    for kind in KINDS:
        for layer in range(layers):
            keys, windows = in_sequence_order(*run.kept_keys(kind, layer))
            if keys.shape[0] < 2 * head_dim:
                result.notes.append(
                    f"{label}: only {keys.shape[0]} kept keys per layer (< 2 × head_dim); no sequence transfer."
                )
                return SequenceTransfer(label, head_dim, notes=result.notes)
            halves[kind].append(halves_fraction(keys, centered))
            fit_windows = fit_windows_of(windows, head_dim, max_windows)
            if fit_windows:
                masks = [windows == w for w in fit_windows]
                per_window[kind].append(masked_fraction(keys, masks, centered))
                control[kind].append(
                    masked_fraction(keys, random_masks_like(masks, layer), centered)
                )
                result.windows_used = len(fit_windows)
    result.per_layer["halves"] = stack_layers(halves)
    if all(len(per_window[k]) == layers for k in KINDS):
        result.per_layer["windows"] = stack_layers(per_window)
        result.per_layer["random"] = stack_layers(control)
    else:
        result.notes.append(
            f"{label}: fewer than 2 windows with ≥ head_dim kept keys; no window-vs-rest transfer."
        )
    require_finite(result.per_layer, "across sequences", run.path)
    return result


def in_sequence_order(
    keys: torch.Tensor, positions: torch.Tensor, windows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort kept keys by (window, position), whatever order ranks and shards stored them in."""
    order = torch.argsort(windows * (int(positions.max()) + 1) + positions, stable=True)
    return keys[order], windows[order]


def stack_layers(
    per_kind: dict[str, list[dict[str, torch.Tensor]]],
) -> dict[str, dict[str, torch.Tensor]]:
    """[{spec: (1, H)} per layer] per kind -> {kind: {spec: (L, H)}}."""
    return {
        kind: {spec: torch.cat([d[spec] for d in layers]) for spec in layers[0]}
        for kind, layers in per_kind.items()
    }
