"""A token budget beside the fraction k (issue 23, item 4): `keyspace validate --budget` and
`keyspace bench [--e2e] --budget`, their parsing and bounds, the kept-token counts they produce
(checked against min(budget, context) computed here, not by the code's helpers), and the
validate headline weighing loki-adaptive rows with the loki rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from loki_fixtures import synthetic_model_run, tiny_llama
from typer.testing import CliRunner

import keyspace.kernels
import keyspace.loki.masked as masked
from keyspace.cli.main import app
from keyspace.errors import KeyspaceError
from keyspace.loki import get_method
from keyspace.options import parse_int, parse_int_list

HOSTILE = ["0", "-3", "abc", "1e3", "2.5", "٣", "99999999999999999999", "512,,", ",512", ""]


def one_error_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert sum(line.startswith("Error: ") for line in lines) == 1, result.output
    assert message in result.output and "Hint: " in result.output, result.output
    assert "Traceback" not in result.output


# ---- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["٣", "１２", "²", "3٣", "+3", " ", "1_000"])
def test_parse_int_takes_ascii_digits_only(text):
    with pytest.raises(KeyspaceError, match="--x must be a whole number"):
        parse_int(text, "--x")


def test_parse_int_refuses_a_number_too_long_for_int_without_a_traceback():
    with pytest.raises(KeyspaceError) as err:
        parse_int("9" * 5000, "--x", 1, 100)
    assert "from 1 to 100" in err.value.message and len(err.value.message) < 200
    assert parse_int(" 12 ", "--x") == 12


def test_parse_int_list_refuses_empty_parts():
    assert parse_int_list("512,2048", "--budget") == (512, 2048)
    for text in ("512,,", ",", "", "512, ,1"):
        with pytest.raises(KeyspaceError, match="--budget must be a whole number"):
            parse_int_list(text, "--budget")


# ---- validate: a synthetic run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return root, synthetic_model_run(root)


def validate(root, run, *args):
    base = ["validate", "--run", str(run), "--dataset", str(root / "corpus.txt")]
    base += ["--window", "64", "--max-tokens", "128"]
    return CliRunner().invoke(app, [*base, *args])


@pytest.mark.parametrize("value", HOSTILE)
def test_validate_budget_hostile_input_is_one_error_line(synthetic, value):
    root, run = synthetic
    one_error_line(validate(root, run, "--budget", value), "--budget must be a whole number")


def test_validate_budget_alone_runs_no_fraction_rows_and_keeps_min_budget_context(
    synthetic, monkeypatch
):
    """--budget 16 (below the 64-token windows): every masked-mode row of a top-k method keeps
    min(16, its context) tokens, and every Loki cache decode step min(16, its length), in
    perplexity, recall, the decode check, passkey and the tasks."""
    root, run = synthetic
    budget, seen, steps = 16, [], []
    original_handler = masked.masked_handler

    def spy_handler(settings):
        select = get_method(settings.method).select

        def handler(module, query, key, value, scale):
            inputs = masked.layer_inputs(settings, module.layer_idx, query, key, scale)
            logits = select(inputs)
            if get_method(settings.method).top_k:
                q_len, kv_len = query.shape[-2], key.shape[-2]
                context = torch.arange(kv_len - q_len + 1, kv_len + 1)  # row i's keys
                kept = torch.isfinite(logits).sum(-1).cpu()  # [B, Hq, T]
                dense = context <= settings.dense_rows
                expected = torch.where(dense, context, context.clamp(max=budget))
                seen.append((settings.method, settings.k, settings.budget))
                assert torch.equal(kept, expected.expand_as(kept)), settings.method
            return masked.attend(logits, value, scale)

        return handler

    decode = keyspace.kernels.loki_decode

    def spy_decode(q, k_low, k_rest, v, k_top, *args, **kwargs):
        steps.append((k_low.shape[2], k_top))
        return decode(q, k_low, k_rest, v, k_top, *args, **kwargs)

    monkeypatch.setattr(masked, "masked_handler", spy_handler)
    monkeypatch.setattr(keyspace.kernels, "loki_decode", spy_decode)
    out = root / "alone"
    args = ["--d", "4", "--budget", str(budget), "--k-mode", "window,row"]
    args += ["--methods", "loki,full,exact-topk,h2o", "--select", "fixed,adaptive"]
    args += ["--decode-prompts", "1", "--decode-prompt-tokens", "40", "--decode-tokens", "3"]
    args += ["--passkey-lengths", "64", "--passkey-count", "1"]
    args += ["--tasks", "niah", "--task-lengths", "96", "--task-count", "1", "--out", str(out)]
    result = validate(root, run, *args)
    assert result.exit_code == 0, result.output
    assert not original_handler is spy_handler  # noqa: E714
    doc = json.loads((out / "validate.json").read_text())
    assert doc["grid"]["k"] == [] and doc["grid"]["k_budget"] == [budget]
    rows = doc["results"]
    # loki, loki-adaptive, exact-topk, h2o: 2 k-modes each at the budget; full once
    assert sorted((r["method"], r["k_mode"]) for r in rows if r["method"] != "full") == sorted(
        (m, mode)
        for m in ("loki", "loki-adaptive", "exact-topk", "h2o")
        for mode in ("window", "row")
    )
    for r in rows:
        if r["method"] == "full":
            assert r["k"] is None and r["k_budget"] is None and r["kept_tokens"] is None
        else:
            assert (
                r["k"] is None and r["k_budget"] == budget and r["kept_tokens"] == min(budget, 64)
            )
    loki = next(r for r in rows if r["method"] == "loki")
    assert loki["kv_bytes_fraction"] == pytest.approx((4 + 2 * (16 / 64) * 16) / (2 * 16))
    assert {(m, k, b) for m, k, b in seen} >= {("loki", None, 16), ("exact-topk", None, 16)}
    # the cache path (decode check, passkey, tasks): min(budget, length) at every step
    assert steps and all(k_top == min(budget, length) for length, k_top in steps)
    assert any(length > budget for length, _ in steps)
    assert [(e["method"], e["k"], e["k_budget"]) for e in doc["decode"]] == [
        ("loki", None, budget),
        ("loki-adaptive", None, budget),
    ]
    assert [(e["method"], e["k_budget"]) for e in doc["passkey"]] == [
        ("full", None), ("loki", budget), ("loki-adaptive", budget),
    ]  # fmt: skip
    # every method has its task row at the budget, h2o through its heavy-hitter steps
    assert [(e["method"], e["k_budget"]) for e in doc["tasks"]] == [
        ("full", None), ("loki", budget), ("loki-adaptive", budget), ("exact-topk", budget),
        ("h2o", budget),
    ]  # fmt: skip
    assert "left out" not in result.output
    assert [(e["k"], e["k_budget"]) for e in doc["recall"]] == [(None, budget)]
    assert doc["recall"][0]["rows"] > 0
    # the printed table, the report: the budget as '16 tok'
    table = [line for line in result.stdout.splitlines() if "exact-topk" in line]
    assert table and all("16 tok" in line for line in table)
    html = (out / "validate.html").read_text()
    assert "16 tok" in html and "k=16 tok" in html


def test_validate_budget_beside_k_and_above_the_context(synthetic):
    """--k 0.25 --budget 8,100: rows for each; 100 tokens is above every row's context (64), so
    Loki keeps everything there and its perplexity is dense's."""
    root, run = synthetic
    args = ["--d", "4", "--k", "0.25", "--budget", "100,8", "--methods", "loki,full"]
    args += ["--decode-prompts", "0", "--recall-windows", "0", "--json"]
    result = validate(root, run, *args, "--out", str(root / "beside"))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["method"], r["k"], r["k_budget"], r["kept_tokens"]) for r in rows] == [
        ("loki", 0.25, None, 16), ("loki", None, 8, 8), ("loki", None, 100, 64),
        ("full", None, None, None),
    ]  # fmt: skip
    ppl = {(r["k"], r["k_budget"]): r["ppl"] for r in rows}
    assert ppl[(None, 100)] == pytest.approx(ppl[(None, None)], rel=1e-5)
    assert ppl[(None, 8)] != pytest.approx(ppl[(None, None)], rel=1e-5)


# ---- bench ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("e2e", [[], ["--e2e"]])
@pytest.mark.parametrize("value", HOSTILE)
def test_bench_budget_hostile_input_is_one_error_line(e2e, value):
    result = CliRunner().invoke(app, ["bench", *e2e, "--d", "32", "--budget", value])
    one_error_line(result, "--budget must be a whole number")


@pytest.mark.parametrize("flag", ["--seq", "--batch", "--kv-heads", "--d", "--heads", "--steps"])
@pytest.mark.parametrize("value", ["٣", "0", "1e3", "-3"])
def test_bench_integer_options_take_ascii_digits_only(flag, value):
    result = CliRunner().invoke(app, ["bench", "--e2e", flag, value])
    one_error_line(result, f"{flag} must be a whole number")


@pytest.mark.parametrize("e2e", [[], ["--e2e"]])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "١", "0.1_25", "0", "1.5", "-0.5", "0.125,", "", "1e400", "0x1p-3"])  # fmt: skip
def test_bench_k_takes_ascii_fractions_in_0_1_only(e2e, value):
    result = CliRunner().invoke(app, ["bench", *e2e, "--d", "32", "--k", value])
    one_error_line(result, "--k must be a fraction in (0, 1]")


def test_fractions_are_parsed_strictly():
    from keyspace.options import parse_fraction, parse_fraction_list

    assert [parse_fraction(t, "--k") for t in ("0.125", ".5", "1", "1.0", "1e-3", " 0.25 ")] == [
        0.125, 0.5, 1.0, 1.0, 0.001, 0.25,
    ]  # fmt: skip
    assert parse_fraction_list(["0.125,0.25", "0.5"], "--k") == [0.125, 0.25, 0.5]
    assert parse_fraction_list(None, "--k") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_e2e_takes_a_budget():
    result = CliRunner().invoke(app, ["bench", "--e2e", "--d", "32", "--budget", "512,2048"])
    one_error_line(result, "keyspace bench --e2e needs a CUDA GPU")
    result = CliRunner().invoke(app, ["bench", "--e2e", "--budget", "512"])
    one_error_line(result, "--d and --k (or --budget) go together")


def bench_e2e_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_e2e_script_takes_budget_points(capsys):
    """benchmarks/bench_e2e.py --budget-point D:TOKENS reaches E2EConfig.budgets; alone it times
    budget rows only; beside --point, both; a bad point is argparse's one usage error."""
    script = bench_e2e_script()

    def points(*argv):
        return script.e2e_config(script.parse_args(list(argv))).loki_points()

    assert points() == [(32, 0.125, None)]
    assert points("--budget-point", "32:2048") == [(32, None, 2048)]
    assert points("--point", "16:0.25", "--budget-point", "32:2048", "--budget-point", "8:512") == [
        (16, 0.25, None), (32, None, 2048), (8, None, 512),
    ]  # fmt: skip
    for bad in ("32", "32:0", "0:2048", "32:2k", "32:١", "32:2048:1", ":2048"):
        with pytest.raises(SystemExit) as stop:
            script.parse_args(["--budget-point", bad])
        assert stop.value.code == 2
        assert "is not D:TOKENS" in capsys.readouterr().err


def test_e2e_config_takes_budget_points():
    from keyspace.bench.e2e import E2EConfig

    cfg = E2EConfig(points=((32, 0.125),), budgets=((32, 2048), (16, 512)))
    assert cfg.loki_points() == [(32, 0.125, None), (32, None, 2048), (16, None, 512)]
    assert E2EConfig(points=(), budgets=((8, 4),)).loki_points() == [(8, None, 4)]
    with pytest.raises(ValueError, match="bad"):
        E2EConfig(budgets=((32, 0),))
    with pytest.raises(ValueError, match="at least one"):
        E2EConfig(points=())


def test_e2e_rows_at_a_budget_on_the_cpu(monkeypatch):
    """run_point on the tiny model, eagerly on the CPU (the CUDA timers and memory calls stubbed):
    a budget row keeps min(budget, view) tokens at every decode step, says so in k_top, and the
    table labels it in tokens."""
    import keyspace.bench.e2e as e2e
    from keyspace.bench.e2e_table import markdown_table
    from keyspace.loki.graphs import DecodeLoopSettings

    def time_steps(loop, steps):
        for _ in range(steps):
            loop.step()
        return [1.0] * steps

    monkeypatch.setattr(e2e, "time_steps", time_steps)
    monkeypatch.setattr(e2e, "free_memory", lambda: None)
    monkeypatch.setattr(e2e, "peak_gb", lambda: 0.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    calls, decode = [], keyspace.kernels.loki_decode

    def spy(q, k_low, k_rest, v, k_top, *args, **kwargs):
        calls.append((k_low.shape[2], k_top))
        return decode(q, k_low, k_rest, v, k_top, *args, **kwargs)

    monkeypatch.setattr(keyspace.kernels, "loki_decode", spy)
    model = tiny_llama()
    loop = DecodeLoopSettings(bucket=4, prefill_chunk=8)
    cfg = e2e.E2EConfig(
        config="smollm2-135m", points=((4, 0.5),), budgets=((4, 6), (4, 99)), steps=3,
        generate_steps=0, split=False, check=False, loop=loop,
    )  # fmt: skip
    rows = e2e.run_point(model, cfg, batch=1, seq=10, gbps=1000.0, log=lambda _: None)
    loki = [(r["k"], r["k_budget"], r["k_top"]) for r in rows if r["method"] == "loki"]
    assert loki == [(0.5, None, 5), (None, 6, 6), (None, 99, 10)]
    assert calls and {k_top for _, k_top in calls} >= {6}
    for view, k_top in calls:  # each step is one of the three rows: ceil(k·view) or min(b, view)
        assert k_top in {math.ceil(0.5 * view), min(6, view), min(99, view)}, (view, k_top)
    assert any(view > 12 and k_top == 6 for view, k_top in calls)
    table = markdown_table(rows)
    assert "Loki d=4 6 tok" in table and "Loki d=4 99 tok" in table and "Loki d=4 k=0.5" in table
    assert all(r.get("speedup_vs_dense") for r in rows)


# ---- the headline weighs loki-adaptive with loki --------------------------------------------------


def test_the_headline_names_the_best_loki_family_row_when_it_is_adaptive():
    from keyspace.reports.validate_report import headline

    def row(method, ppl, k=0.125, k_budget=None, kv=0.25):
        return {
            "method": method, "d": 16 if method != "full" else None, "d_mean": None, "k": k,
            "k_budget": k_budget, "k_mode": "window" if method != "full" else None, "ppl": ppl,
            "kv_bytes_fraction": kv if method != "full" else 1.0, "basis": "key",
            "tokens": 2048,
        }  # fmt: skip

    doc = {
        "dataset": {"spec": "wikitext", "split": "test", "window": 1024, "windows": 2},
        "k_modes": ["window"], "recall": [], "head_dim": 64, "rotary": "post",
        "results": [
            row("full", 10.0, None), row("loki", 13.0), row("loki-adaptive", 11.0, kv=0.3),
            row("loki-adaptive", 10.5, None, 2048, kv=0.3),
        ],
        "tasks": [
            {"method": "full", "task": "niah", "length": 4096, "accuracy": 1.0, "ci_low": 0.7,
             "ci_high": 1.0, "d": None, "k": None, "count": 10},
            {"method": "loki-adaptive", "task": "niah", "length": 4096, "accuracy": 0.5,
             "ci_low": 0.2, "ci_high": 0.8, "d": 16, "k": 0.125, "count": 10, "basis": "key"},
        ],
    }  # fmt: skip
    text = headline(doc)
    # the cheapest setting (fixed Loki), then the best of the family: adaptive, at a token budget
    assert "perplexity 13.00 vs 10.00 dense (+30.0%) at d=16, k=1/8, reading 25%" in text, text
    assert ", and 10.50 (+5.0%) at d=16, k=2048 tok (loki-adaptive), reading 30%" in text, text
    assert (
        "loses most on niah at 4096 tokens: 0.50 [0.20, 0.80] at d=16, k=1/8 (loki-adaptive)"
        in text
    )
    doc["results"] = [r for r in doc["results"] if r["method"] != "loki-adaptive"]
    doc["tasks"] = []
    assert "loki-adaptive" not in headline(doc)
