"""Readers of a run's analysis: the ranks document and the calibration, each verified, and the
commands that rewrite them. Every later stage reads the analysis through here, not through the
analyze stage that writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError, shell_command
from keyspace.runfolder.calibration import Calibration, calibration_from_bytes
from keyspace.runfolder.store import (
    RANKS,
    RunFolder,
    calibration_path,
    ranks_path,
    read_file,
    read_verified,
    seal_problem,
)


def analyze_command(run_path: str | Path) -> str:
    return shell_command("keyspace", "analyze", run_path)


def analyze_hint(run_path: str | Path) -> str:
    return f"`{analyze_command(run_path)}` rewrites the analysis from the run's moments."


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


def collect_again(manifest: dict, out: str | Path, window: int | None = None) -> str:
    """`keyspace collect ...`, then `keyspace analyze ...`: a new run at `out` from the model and
    corpus of the run `manifest` describes, with queries, in `window`-token windows (default: the
    run's own)."""
    model, dataset = manifest.get("model") or {}, manifest.get("dataset") or {}
    window = window or manifest.get("window", 1024)
    tokens = manifest.get("max_tokens") or manifest.get("tokens") or "all"
    if isinstance(tokens, int) and tokens < window:
        tokens = window  # at least one whole window
    words: list[object] = ["keyspace", "collect", "--model", model.get("spec", "?")]
    words += ["--dataset", dataset.get("spec", "?")]
    if dataset.get("split"):
        words += ["--split", dataset["split"]]
    words += ["--window", window, "--max-tokens", tokens]
    words += ["--capture", "keys,queries", "--out", out]
    return f"`{shell_command(*words)}`, then `{analyze_command(out)}`"


def queries_hint(run_path: str | Path) -> str:
    """How to give a run collected without queries its query and score spectra."""
    again = collect_again(RunFolder.open(run_path).manifest, f"{Path(run_path)}-queries")
    return f"Collect it again with queries: {again}."


def read_score_transforms(
    run_path: str | Path, kind: str, ranks: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the run's query-aware basis, each (layers, kv_heads, D, D), verified; a run
    collected without queries is a KeyspaceError that says how to collect them."""
    calibration = read_calibration(run_path, ranks)
    if calibration.has_queries:
        return calibration.score_transforms(kind)
    return calibration.score_transforms(kind, queries_hint(run_path))
