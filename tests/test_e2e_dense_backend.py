"""The e2e bench's table and log lines name the dense attention its dense loop runs."""

from keyspace.bench.e2e_table import format_row, markdown_table

ROW = {
    "batch": 1,
    "seq": 4096,
    "method": "dense",
    "step_ms": 5.0,
    "tokens_per_s": 200.0,
    "floor_ms": 4.0,
    "floor_pct": 80.0,
    "speedup_vs_dense": 1.0,
}


def test_the_markdown_header_names_the_dense_backend():
    from keyspace.bench.dense import E2E_DENSE_BACKEND

    header = markdown_table([ROW]).splitlines()[0]
    assert f"× dense loop ({E2E_DENSE_BACKEND})" in header
    assert "SDPA" in E2E_DENSE_BACKEND


def test_a_dense_log_line_names_the_dense_backend():
    from keyspace.bench.dense import E2E_DENSE_BACKEND

    assert f"dense ({E2E_DENSE_BACKEND})" in format_row(ROW)
    loki = {**ROW, "method": "loki", "d": 32, "k": 0.125}
    assert E2E_DENSE_BACKEND not in format_row(loki)
