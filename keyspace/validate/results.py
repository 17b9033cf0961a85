"""validate's result records, and the small statistics computed on them (no model code here)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr

from keyspace.errors import KeyspaceError
from keyspace.reports.validate_report import write_validate_report
from keyspace.runfolder.store import read_regular, write_json_atomic

VALIDATE_JSON = "validate.json"


@dataclass
class ResultRow:
    """One perplexity measurement; `d` and `k`/`k_mode` are None for methods that do not use them."""

    method: str
    d: int | str | None  # an int for a fixed d, "auto:τ" for per-head ranks
    d_mean: float | None
    k: float | None
    k_mode: str | None
    ppl: float
    nll: float
    tokens: int
    predicted_tokens: int
    kv_bytes_fraction: float
    seconds: float
    basis: str | None = None  # "key" or "query-aware" for methods that use a basis (loki, pcaattn)
    # `--budget`: tokens kept per row, min(k_budget, context); then k is None
    k_budget: int | None = None
    # tokens the last row of a window keeps (ceil(k·window) or min(k_budget, window)); None for
    # methods that keep everything. A token budget's KV-bytes share is taken at that row.
    kept_tokens: int | None = None


@dataclass
class ValidateResult:
    """All of validate's measurements; `to_json` is the validate.json document."""

    header: dict
    results: list[ResultRow]
    recall: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)
    passkey: list[dict] = field(default_factory=list)
    speed: dict = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)  # one row per (method, d, k, task, length)

    def to_json(self) -> dict:
        return {
            **self.header,
            "results": [asdict(r) for r in self.results],
            "recall": self.recall,
            "decode": self.decode,
            "passkey": self.passkey,
            "tasks": self.tasks,
            "speed": self.speed,
        }


def spearman(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Spearman's ρ and its p-value over matching entries; None where either side is constant."""
    a, b = x.flatten().double().numpy(), y.flatten().double().numpy()
    if a.std() == 0 or b.std() == 0:
        return {"rho": None, "p": None, "n": int(a.size)}
    rho, p = spearmanr(a, b)
    return {"rho": float(rho), "p": float(p), "n": int(a.size)}


def speed_ceilings(rows: list[ResultRow]) -> dict:
    """The analytic share of KV bytes read, (d + 2·k·D) / (2·D) for Loki: a ceiling, even on CPU."""
    return {
        "analytic": [
            {
                "method": r.method,
                "d": r.d,
                "k": r.k,
                "k_budget": r.k_budget,
                "basis": r.basis,
                "kv_bytes_fraction": r.kv_bytes_fraction,
                "max_speedup": 1 / r.kv_bytes_fraction,
            }
            for r in rows
        ],
        "measured": None,
    }


def write_outputs(doc: dict, out: str | Path) -> list[Path]:
    """validate.json, then the HTML + PNG report beside it; returns the paths written."""
    out = Path(out)
    write_json_atomic(out / VALIDATE_JSON, doc)
    return [out / VALIDATE_JSON, *write_validate_report(doc, out)]


# ---- reading validate.json back (to re-render it): parse, then trust -------------------------

SECTIONS = ("results", "recall", "decode", "passkey", "tasks")
ROW_FIELDS = {"method": str, "tokens": int, "ppl": float, "nll": float, "kv_bytes_fraction": float}


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_doc_problem(doc: object) -> str | None:
    """What makes a validate.json document unusable for re-rendering ("<field> <why>"), or None:
    its sections of the right types, each result row's fields typed, every number in every
    section finite or null."""
    if not isinstance(doc, dict):
        return "the document is not a JSON object"
    for section in SECTIONS:
        rows = doc.get(section, [])
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return f"{section} is not a list of objects"
    if not isinstance(doc.get("speed", {}), dict):
        return "speed is not an object"
    for i, row in enumerate(doc.get("results", [])):
        for name, kind in ROW_FIELDS.items():
            value = row.get(name)
            ok = isinstance(value, str) if kind is str else _finite_number(value)
            if kind is float:  # null: a diverged method (its NaN or infinity, written as null)
                ok = ok or (name in row and value is None)
            if kind is int:
                ok = ok and isinstance(value, int) and value >= 0
            if not ok:
                return f"results[{i}].{name} is {value!r}"
    return _nonfinite(doc, "")


def _nonfinite(value: object, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where.lstrip('.')} is {value!r}, not a finite number"
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        problem = _nonfinite(
            item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
        )
        if problem:
            return problem
    return None


def read_validate_json(path: str | Path, hint: str) -> dict:
    """A validate.json, parsed and checked (`validate_doc_problem`); one KeyspaceError naming the
    file and the field otherwise. `hint`: the validate command that writes it again."""
    path = Path(path)
    try:
        doc = json.loads(read_regular(path, hint))  # a FIFO or a link: refused, not read
    except OSError as err:
        raise KeyspaceError(f"{path} cannot be read ({err.strerror or err}).", hint) from None
    except ValueError as err:
        raise KeyspaceError(f"{path} is not valid JSON ({err}).", hint) from None
    problem = validate_doc_problem(doc)
    if problem:
        raise KeyspaceError(f"{path} is damaged: {problem}.", hint)
    return doc
