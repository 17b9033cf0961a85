"""Readers of a run's analysis: the ranks document and the calibration, each verified, then
checked, and the commands that rewrite them. Every later stage reads the analysis through here,
not through the analyze stage that writes it.

The analysis is one commit (keyspace.analyze.pca.write_analysis): the new calibration is written
under a content-addressed name (`staged_calibration_path`), then ranks.json records its sha256
(the commit point), then it is renamed over calibration.safetensors. A reader that finds the
staged file named by ranks.json's record reads it: the commit happened, the rename did not yet.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from keyspace.errors import FileSystemError, KeyspaceError, shell_command
from keyspace.runfolder.calibration import Calibration, calibration_from_bytes
from keyspace.runfolder.manifest import Manifest
from keyspace.runfolder.store import (
    CALIBRATION,
    KINDS,
    RANKS,
    RunFolder,
    calibration_path,
    ranks_path,
    read_file,
    read_verified,
    seal_problem,
    sealed,
    write_bytes_atomic,
    write_json_atomic,
)


def analyze_command(run_path: str | Path) -> str:
    return shell_command("keyspace", "analyze", run_path)


def analyze_hint(run_path: str | Path) -> str:
    return f"`{analyze_command(run_path)}` rewrites the analysis from the run's moments."


def staged_calibration_path(run_path: str | Path, sha256: str) -> Path:
    """Where analyze writes a new calibration before it commits it: named by its content."""
    stem = CALIBRATION.removesuffix(".safetensors")
    return Path(run_path) / f"{stem}.{sha256[:16]}.safetensors"


def committed_calibration_path(run_path: str | Path, ranks: dict) -> Path:
    """The file holding the calibration `ranks` records: the staged one when the commit happened
    but the rename did not, else calibration.safetensors."""
    sha256 = ranks.get("calibration_sha256")
    staged = staged_calibration_path(run_path, sha256) if sha256 else None
    return staged if staged is not None and staged.is_file() else calibration_path(run_path)


def commit_analysis(run_path: str | Path, calibration: bytes, ranks: dict) -> tuple[Path, Path]:
    """Write a calibration's bytes and the ranks document recording their sha256, as one commit.

    1. the calibration under a content-addressed name (`staged_calibration_path`);
    2. ranks.json, sealed: the commit point; from here readers take the staged file it names;
    3. the staged file renamed over calibration.safetensors, other staged files removed.
    Ctrl-C before 2 leaves the old pair (and a stray staged file, removed next time); after 2, the
    new one. The caller holds the folder lock. Returns (ranks path, calibration path).
    """
    sha256 = hashlib.sha256(calibration).hexdigest()
    write_bytes_atomic(staged_calibration_path(run_path, sha256), calibration)
    write_json_atomic(ranks_path(run_path), sealed({**ranks, "calibration_sha256": sha256}))
    finish_commit(run_path)
    return ranks_path(run_path), calibration_path(run_path)


def finish_commit(run_path: str | Path) -> None:
    """Complete a committed analysis: rename its staged calibration into place, remove other
    staged files (of a commit that never happened). The caller holds the folder lock."""
    doc = read_ranks(run_path)
    committed = committed_calibration_path(run_path, doc) if doc else None
    if committed is not None and committed != calibration_path(run_path):
        try:
            os.replace(committed, calibration_path(run_path))
        except OSError as err:
            raise FileSystemError(calibration_path(run_path), err) from None
    stem = CALIBRATION.removesuffix(".safetensors")
    for stray in Path(run_path).glob(f"{stem}.*.safetensors"):
        stray.unlink(missing_ok=True)


def read_ranks(run_path: str | Path) -> dict | None:
    """The ranks document of a run, verified by its checksum, then checked field by field
    (`ranks_problem`); None when the run has none."""
    path, hint = ranks_path(run_path), analyze_hint(run_path)
    if not path.exists():
        return None
    try:
        doc = json.loads(read_file(path, hint))
    except ValueError as err:
        raise KeyspaceError(f"{path} is damaged: it is not valid JSON ({err}).", hint) from None
    problem = seal_problem(doc) or ranks_problem(doc)
    if problem:
        raise KeyspaceError(f"{path} is damaged: {problem}.", hint)
    return doc


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _table_problem(table: object, shape: tuple[int, ...], check) -> str | None:
    """Why `table` is not a nested list of `shape` whose leaves pass `check`, or None."""
    if not shape:
        return None if check(table) else f"holds {table!r}"
    if not isinstance(table, list) or len(table) != shape[0]:
        return f"is not a list of {shape[0]}"
    for row in table:
        problem = _table_problem(row, shape[1:], check)
        if problem:
            return problem
    return None


def _ratio(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and -1e-9 <= value <= 1 + 1e-9
    )


def ranks_problem(doc: dict) -> str | None:
    """What makes a ranks document unusable ("field <name> <why>"), or None.

    Every field a later stage reads must be present and well-formed (head_dim, rank_at per kind);
    every other field analyze writes must be well-formed where present (documents written by
    hand in tests, or by older versions, lack some): the sizes, the hashes, ranks within
    [0, head_dim] and of one shape, ratio vectors finite and in [0, 1].
    """
    for key in ("num_layers", "num_kv_heads", "head_dim", "tokens", "format_version"):
        low = 0 if key == "tokens" else 1
        if (key in doc or key == "head_dim") and not _is_int(doc.get(key), low, 1 << 62):
            return f"field {key} is {doc.get(key)!r}, not a positive integer"
    for key in ("moments_sha256", "calibration_sha256"):
        if key in doc and not isinstance(doc[key], str):
            return f"field {key} is {doc[key]!r}, not a string"
    for key in ("centered", "queries"):
        if not isinstance(doc.get(key, False), bool):
            return f"field {key} is {doc.get(key)!r}, not true or false"
    spectra = ("", "query_", "score_") if doc.get("queries") else ("",)
    shape = _ranks_shape(doc)
    for kind in KINDS:
        entry = doc.get(kind)
        if not isinstance(entry, dict):
            return f"field {kind} is {entry!r}, not an object"
        for prefix in spectra:
            problem = _spectrum_problem(entry, prefix, shape, doc["head_dim"])
            if problem:
                return f"field {kind}.{problem}"
    return None


def _ranks_shape(doc: dict) -> tuple[int, int]:
    """(layers, kv_heads) the document records, else that of its first rank table."""
    if "num_layers" in doc and "num_kv_heads" in doc:
        return doc["num_layers"], doc["num_kv_heads"]
    first = next(iter(((doc.get("pre") or {}).get("rank_at") or {"": [[]]}).values()), [[]])
    rows = first if isinstance(first, list) and first else [[]]
    return len(rows), len(rows[0]) if isinstance(rows[0], list) else 0


def _spectrum_problem(
    entry: dict, prefix: str, shape: tuple[int, int], head_dim: int
) -> str | None:
    ratios = entry.get(f"{prefix}explained_variance_ratio")
    problem = None if ratios is None else _table_problem(ratios, (*shape, head_dim), _ratio)
    if problem:
        return f"{prefix}explained_variance_ratio {problem}, not finite ratios in [0, 1] of shape {(*shape, head_dim)}"
    table = entry.get(f"{prefix}rank_at")
    if not isinstance(table, dict) or not table:
        return f"{prefix}rank_at is {table!r}, not an object of thresholds"
    for tau, ranks in table.items():
        try:
            valid_tau = 0.0 < float(tau) <= 1.0
        except ValueError:
            valid_tau = False
        if not valid_tau:
            return f"{prefix}rank_at has the threshold {tau!r}, not one in (0, 1]"
        problem = _table_problem(ranks, shape, lambda r: _is_int(r, 0, head_dim))
        if problem:
            return f"{prefix}rank_at.{tau} {problem}, not ranks in [0, {head_dim}] of shape {shape}"
    return None


def read_calibration(run_path: str | Path, ranks: dict | None = None) -> Calibration:
    """The run's calibration, verified against the sha256 its ranks document records, its shape
    that of the ranks document, every value finite."""
    path, hint = calibration_path(run_path), analyze_hint(run_path)
    ranks = ranks if ranks is not None else read_ranks(run_path)
    if ranks is None:
        what = (
            "no analysis"
            if not path.exists()
            else f"a {path.name} but no {RANKS} recording its hash"
        )
        raise KeyspaceError(f"run {run_path} has {what}.", hint)
    path = committed_calibration_path(run_path, ranks)
    data = read_verified(path, ranks.get("calibration_sha256"), hint)
    calibration = calibration_from_bytes(data, path, hint)
    shape = (*_ranks_shape(ranks), ranks["head_dim"])
    for kind, components in calibration.components.items():
        if tuple(components.shape[:3]) != shape:
            raise KeyspaceError(
                f"{path} holds a {kind} basis of shape {tuple(components.shape[:3])}, but"
                f" {RANKS} records {shape}.",
                hint,
            )
    return calibration


def collect_again(
    manifest: Manifest, out: str | Path, window: int | tuple[int, ...] | None = None
) -> str:
    """`keyspace collect ...`, then `keyspace analyze ...`: a new run at `out` from the model and
    corpus of the run `manifest` describes, with queries, in `window`-token windows: one length,
    several mixed (a tuple), or by default the run's own (every length of a run of several)."""
    lengths = window if isinstance(window, tuple) else (window,) if window else manifest.lengths
    tokens: int | str = manifest.max_tokens or manifest.tokens or "all"
    if isinstance(tokens, int) and tokens < len(lengths) * max(lengths):
        tokens = len(lengths) * max(lengths)  # at least one whole window of each length
    words: list[object] = ["keyspace", "collect", "--model", manifest.model_spec or "?"]
    words += ["--dataset", manifest.dataset_spec or "?"]
    if manifest.dataset_split:
        words += ["--split", manifest.dataset_split]
    words += ["--window", ",".join(map(str, lengths)), "--max-tokens", tokens]
    words += ["--capture", "keys,queries", "--out", out]
    return f"`{shell_command(*words)}`, then `{analyze_command(out)}`"


def queries_hint(run_path: str | Path) -> str:
    """How to give a run collected without queries its query and score spectra."""
    again = collect_again(RunFolder.open(run_path).manifest, f"{Path(run_path)}-queries")
    return f"Collect it again with queries: {again}."
