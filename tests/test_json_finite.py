"""JSON the tool writes is strict JSON: a NaN or an Infinity is written as null, never bare."""

import hashlib
import json
import math

import pytest

from keyspace.bench.e2e_table import save_result
from keyspace.runfolder.files import content_checksum, seal_problem, sealed, write_json_atomic

NONFINITE = {
    "ppl": float("nan"),
    "rows": [{"speedup": float("inf"), "ok": 1.5}, [float("-inf"), 2]],
    "nested": {"x": (float("nan"), 0.0)},
}
NULLED = {
    "ppl": None,
    "rows": [{"speedup": None, "ok": 1.5}, [None, 2]],
    "nested": {"x": [None, 0.0]},
}


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"bare {name} in the file")

    return json.loads(text, parse_constant=refuse)


def test_run_files_write_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "validate.json"  # validate.json goes through write_json_atomic
    write_json_atomic(path, NONFINITE)
    assert _strict(path.read_text()) == NULLED


def test_a_sealed_document_with_a_nan_reads_back_as_sealed(tmp_path):
    path = tmp_path / "ranks.json"
    write_json_atomic(path, sealed(NONFINITE))
    doc = _strict(path.read_text())
    assert doc["ppl"] is None and seal_problem(doc) is None


def test_a_document_sealed_by_an_older_keyspace_with_a_bare_nan_still_verifies(tmp_path):
    body = {"ratio": float("nan"), "n": 3}
    legacy = json.dumps(body, sort_keys=True, separators=(",", ":"))
    doc = json.loads(
        json.dumps({**body, "content_sha256": hashlib.sha256(legacy.encode()).hexdigest()})
    )
    assert math.isnan(doc["ratio"]) and seal_problem(doc) is None
    assert content_checksum(doc) == content_checksum({**doc, "ratio": None})


def test_the_e2e_bench_json_is_strict(tmp_path, monkeypatch):
    from keyspace.bench import e2e_table

    monkeypatch.setattr(e2e_table, "markdown_table", lambda rows: "")
    save_result(
        {"rows": [{"method": "dense", "tok_s": float("nan"), "ms": float("inf")}]}, tmp_path
    )
    doc = _strict((tmp_path / "e2e.json").read_text())
    assert doc["rows"][0]["tok_s"] is None and doc["rows"][0]["ms"] is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_kernel_bench_json_is_strict(tmp_path, monkeypatch, value):
    from keyspace.bench import kernels

    monkeypatch.setattr(kernels, "markdown_table", lambda rows: "")
    kernels.save_result({"rows": [{"speedup": value}]}, tmp_path)
    assert _strict((tmp_path / "bench_decode.json").read_text()) == {"rows": [{"speedup": None}]}
