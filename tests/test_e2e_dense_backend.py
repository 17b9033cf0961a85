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


def test_check_names_cover_dense_fraction_and_budget():
    # check_loop names the dense check too: d, k and budget are all None there (a format of None
    # crashed the first H100 run of issue 24's bench).
    from keyspace.bench.e2e import check_name

    assert check_name(None, None, None) == "dense"
    assert check_name(32, 0.125, None) == "loki d=32 k=0.125"
    assert check_name(16, None, 2048) == "loki d=16 budget=2048"
    assert check_name(32, 1.0, None) == "loki d=32 k=1"
