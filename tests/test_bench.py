"""The kernel benchmark's CPU-testable parts: the dense backends tried and their refusals, the
"baseline below its floor" rule, the byte floors of adaptive rows, and the sweep's rows built end
to end on CPU (Triton interpreter, timers stubbed to one call each)."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import keyspace.bench.kernels as bench
from keyspace.bench.dense import DENSE_BACKENDS, sdpa_step, time_dense
from keyspace.cli.main import app
from keyspace.kernels import dense_attention_reference


def _sets(batch=1, q_heads=4, kv_heads=2, seq=40, head_dim=16, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "q": torch.randn(batch, q_heads, head_dim, generator=gen),
            "keys": torch.randn(batch, kv_heads, seq, head_dim, generator=gen),
            "v": torch.randn(batch, kv_heads, seq, head_dim, generator=gen),
        }
        for _ in range(n)
    ]


def test_every_dense_backend_is_tried_and_the_fastest_is_the_baseline():
    tried = []
    ms = {"cudnn": 0.5, "flash": 0.9, "efficient": 0.7, "default": 0.6}

    def step_of(q, keys, v, name):
        def step():
            tried.append(name)
            if name == "cudnn":
                raise RuntimeError("No available kernel. Aborting execution.\nmore text")
            return q

        step.backend = name
        return step

    result = time_dense(_sets(), lambda fns: ms[fns[0].backend], step_of)
    assert DENSE_BACKENDS == ("cudnn", "flash", "efficient", "default")
    assert tried == list(DENSE_BACKENDS)  # each probed once, in order, before its timing
    assert result["dense_unavailable"] == {"cudnn": "No available kernel. Aborting execution."}
    assert result["dense_ms_by_backend"] == {"flash": 0.9, "efficient": 0.7, "default": 0.6}
    assert result["dense_backend"] == "default" and result["sdpa_ms"] == 0.6


def test_no_dense_backend_leaves_no_baseline():
    def refuse(q, keys, v, name):
        def step():
            raise NotImplementedError(f"{name} refuses")

        return step

    result = time_dense(_sets(), lambda fns: 1.0, refuse)
    assert result["dense_backend"] is None and math.isnan(result["sdpa_ms"])
    assert set(result["dense_unavailable"]) == set(DENSE_BACKENDS)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_real_sdpa_backends_on_cpu_compute_dense_attention(kv_heads):
    # On CPU cuDNN refuses (recorded with its reason); those that run match the fp32 oracle.
    sets = _sets(kv_heads=kv_heads)
    outputs = {}

    def timer(fns):
        outputs[len(outputs)] = fns[0]()[:, :, 0]
        return float(len(outputs))

    result = time_dense(sets, timer)
    assert "cudnn" in result["dense_unavailable"] and result["dense_unavailable"]["cudnn"]
    assert "default" in result["dense_ms_by_backend"]
    ref = dense_attention_reference(sets[0]["q"], sets[0]["keys"], sets[0]["v"])
    for out in outputs.values():
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for name in result["dense_ms_by_backend"]:
        out = sdpa_step(sets[0]["q"], sets[0]["keys"], sets[0]["v"], name)()
        assert out.shape == (1, 4, 1, 16)


def _row(speedup_ms: float, dense_bytes: int = 800, loki_bytes: int = 200) -> dict:
    row = {"sdpa_ms": 1.0, "loki_ms": speedup_ms, "dense_bytes": dense_bytes}
    return bench.finish_row(row | {"loki_bytes": loki_bytes}, floor_gbps=1.0)


def test_a_speedup_above_the_floor_ratio_is_flagged():
    above, at, below = _row(1 / 4.2), _row(1 / 4.0), _row(1 / 3.0)  # floor ratio 4x
    assert above["floor_speedup"] == 4.0 and above["speedup"] == pytest.approx(4.2)
    assert above["baseline_below_floor"] and above["flag"] == bench.BELOW_FLOOR
    assert not at["baseline_below_floor"] and not below["baseline_below_floor"]
    assert at["flag"] == below["flag"] == ""
    table = bench.markdown_table([_labels() | r for r in (above, below, _row(1.0, 1, 1))])
    lines = table.splitlines()
    assert bench.BELOW_FLOOR in lines[2] and bench.BELOW_FLOOR not in lines[3] + lines[4]
    assert bench.BELOW_FLOOR in bench.format_row(_labels() | above)


def _labels() -> dict:
    keys = [key for _, key, _ in bench.TABLE_COLUMNS]
    filler = {key: 0.5 for key in keys}
    return filler | {"method": "loki", "select": "mha", "dense_backend": "cudnn", "kv_heads": 32,
                     "seq": 4096, "d": 16, "k_top": 256}  # fmt: skip


@pytest.mark.parametrize("group", [True, False])
def test_adaptive_rows_floor_is_r_streams_plus_the_kept_rows(group):
    cfg = bench.BenchConfig(batch=16, q_heads=32, kv_heads=(8,), head_dim=128)
    seq, r, k_top, es = 32768, 16, 2048, 2
    dense, loki = bench._floor_bytes(cfg, 8, seq, r, k_top, group)
    qo = 2 * 16 * 32 * 128 * es
    sets = 8 if group else 32
    assert dense == 2 * 16 * 8 * seq * 128 * es + qo
    assert loki == 16 * 8 * r * seq * es + 16 * sets * k_top * 2 * 128 * es + qo
    mha = bench.BenchConfig(batch=16, q_heads=32, kv_heads=(32,), head_dim=128)
    dense, loki = bench._floor_bytes(mha, 32, seq, 16, seq // 16, True)
    assert 7.5 < dense / loki < 8.0  # d=16, k=1/16: about 8x, less the queries and outputs


def test_points_budgets_and_the_adaptive_store():
    cfg = bench.BenchConfig(points=((32, 1 / 8),), budgets=((16, 2048), (16, 99999)), head_dim=128)
    assert cfg.k_points(4096) == [
        (32, 1 / 8, None, 512),
        (16, 0.5, 2048, 2048),
        (16, 1.0, 99999, 4096),
    ]
    assert cfg.store_d_max() == 64
    assert bench.BenchConfig(points=((96, 0.1),)).store_d_max() == 96
    assert bench.BenchConfig(points=((8, 0.1),), head_dim=32).store_d_max() == 32
    assert (16, 1 / 16) in bench.BenchConfig.points and (32, 1 / 8) in bench.BenchConfig.points
    with pytest.raises(ValueError, match="budget point"):
        bench.BenchConfig(budgets=((16, 0),))


def test_sweep_rows_fixed_d_beside_adaptive_on_cpu(monkeypatch):
    """The sweep's row building end to end: every timed callable runs once through the Triton
    interpreter (the timers are stubbed), fixed-d and adaptive rows pair up at equal d and k."""
    calls = []

    def once(fns, *args):
        for fn in fns:
            fn()
        calls.append(len(fns))
        return 1.0

    monkeypatch.setattr(bench, "graph_ms", once)
    monkeypatch.setattr(bench, "eager_ms", once)
    cfg = bench.BenchConfig(batch=1, q_heads=4, kv_heads=(2,), head_dim=32, seqs=(300,),
                            points=((8, 0.25),), budgets=((8, 20),), adaptive=True,
                            adaptive_d_max=16)  # fmt: skip
    sets = _sets(q_heads=4, kv_heads=2, seq=300, head_dim=32)
    dense = {"sdpa_ms": 2.0, "dense_backend": "flash", "dense_ms_by_backend": {"flash": 2.0}}
    rows = bench._shape_rows(cfg, sets, 2, 300, dense, 1.0, log=lambda line: None)
    assert [(r["method"], r["select"], r["k_top"]) for r in rows] == [
        (m, s, k) for k in (75, 20) for s in ("group", "head") for m in ("loki", "loki-adaptive")
    ]
    for fixed, adaptive in zip(rows[::2], rows[1::2], strict=True):
        assert fixed["floor_speedup"] == adaptive["floor_speedup"]
        assert adaptive["loki_ms"] == 1.0 and adaptive["dense_backend"] == "flash"
    assert all(set(s) == {"q", "keys", "v"} for s in sets)  # the stores are dropped after
    assert len(calls) == 8 * 6  # per row: step (graph, eager) and four stages


def test_bench_cli_checks_budget():
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--d", "32", "--budget", "0"])
    assert result.exit_code == 2 and "--budget must be a whole number" in result.output
    result = runner.invoke(app, ["bench", "--e2e", "--d", "32", "--budget", "٣"])
    assert result.exit_code == 2 and "--budget must be a whole number" in result.output
    # --e2e takes a budget now (tests/test_budget_option.py): past the parsing, the GPU check
