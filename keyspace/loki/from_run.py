"""What `Loki.from_run` reads from an analyzed run folder, and the argument checks it shares with
`Loki.from_tensors`: the verified calibration, d per (layer, KV head) ("auto:τ" from the ranks), and
σ per basis coordinate (`key_scales`, also validate's source of σ for masked-mode loki-adaptive).
"""

from __future__ import annotations

from pathlib import Path

import torch

from keyspace.errors import KeyspaceError, shell_command
from keyspace.runfolder.analysis import analyze_hint, queries_hint, read_calibration, read_ranks
from keyspace.runfolder.store import RunFolder, ranks_path

BASES = ("key", "query-aware")
KINDS = ("pre", "post")
SELECTS = ("fixed", "adaptive")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KeyspaceError(
            f"{name} must be one of {', '.join(choices)}, got {value!r}.",
            f"Pass {name}={choices[0]!r} or {name}={choices[-1]!r}.",
        )


def open_calibration(run: str | Path, kind: str):
    """(run folder path, ranks, calibration) of an analyzed run whose analysis is of its moments
    now and holds the `kind` basis; one KeyspaceError with a repairing hint otherwise."""
    folder = RunFolder.open(run).require_complete()
    ranks, hint = read_ranks(folder.path), analyze_hint(folder.path)
    calibration = read_calibration(folder.path, ranks)
    if ranks.get("moments_sha256") != folder.moments_sha256:
        raise KeyspaceError(
            f"the analysis in {folder.path} was computed from other moments than it holds now.",
            hint,
        )
    if kind not in calibration.components:
        raise KeyspaceError(f"the calibration of {folder.path} has no {kind} basis.", hint)
    return folder.path, ranks, calibration


def transforms(calibration, kind: str, basis: str, path: Path):
    """(key transform A, query transform B or None for B = A) of `basis`, each (layers, kv_heads,
    D, D); the query-aware basis of a run collected without queries is a KeyspaceError."""
    if basis != "query-aware":
        return calibration.components[kind], None
    fix = analyze_hint(path) if calibration.has_queries else queries_hint(path)
    return calibration.score_transforms(kind, fix)


def key_scales(calibration, kind: str, bases: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """basis -> σ_j = sqrt(eigenvalue_j) per coordinate, (layers, kv_heads, D): the spread of
    k~_j = (A k)_j. For the key basis the key covariance's eigenvalues; for the query-aware basis
    those of S_q^½ C_k S_q^½, which are the variances of k~ = A k (A C_k Aᵀ is diagonal)."""
    scales = {"key": calibration.eigenvalues[kind].clamp_min(0.0).sqrt()}
    if "query-aware" in bases and kind in calibration.score_eigenvalues:
        scales["query-aware"] = calibration.score_eigenvalues[kind].clamp_min(0.0).sqrt()
    return scales


def dims_tensor(d, shape: tuple[int, int]) -> torch.Tensor:
    """d (an int, one per layer, or one per (layer, KV head)) as (layers, kv_heads) long."""
    if isinstance(d, bool) or not isinstance(d, int | list | tuple | torch.Tensor):
        raise KeyspaceError(
            f"d must be an int, one per layer or a (layers, kv_heads) tensor, got {d!r}.",
            'Examples: d=32, d=[16, 32, ...], or from_run(..., d="auto:0.9").',
        )
    dims = torch.as_tensor(d, dtype=torch.long)
    if dims.dim() == 1 and dims.shape[0] == shape[0]:
        dims = dims[:, None]
    if dims.dim() > 2 or not (dims.dim() == 0 or dims.shape[0] == shape[0]):
        raise KeyspaceError(
            f"d has shape {tuple(dims.shape)}; the basis has {shape[0]} layers and {shape[1]}"
            " KV heads.",
            "Pass one int, one d per layer, or one per (layer, KV head).",
        )
    return dims.expand(shape).clone()


def run_dims(d, ranks: dict, kind: str, basis: str, run: Path) -> int | torch.Tensor:
    """An int d as is; "auto:τ" as rank@τ per (layer, KV head) from the run's ranks (at least 1)."""
    if not isinstance(d, str):
        return d
    if d.isdigit():
        return int(d)
    tau = d.removeprefix("auto:")
    try:
        tau = float(tau) if d.startswith("auto:") else None
    except ValueError:
        tau = None
    if tau is None:
        raise KeyspaceError(
            f"d {d!r} is not an integer or auto:τ.", 'Examples: d=32, d="auto:0.9".'
        )
    field = "score_rank_at" if basis == "query-aware" else "rank_at"
    table = ranks.get(kind, {}).get(field, {})
    for key, value in table.items():
        if abs(float(key) - tau) < 1e-9:
            return torch.tensor(value, dtype=torch.long).clamp(min=1)
    raise KeyspaceError(
        f"{ranks_path(run)} has no {kind} {field} at τ={tau} (it has {', '.join(table) or 'none'}).",
        f"Run `{shell_command('keyspace', 'analyze', run, '--threshold', tau)}` to write ranks"
        f" at τ={tau}.",
    )
