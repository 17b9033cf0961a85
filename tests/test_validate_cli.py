"""`keyspace validate` end to end on a synthetic run: a tiny random Llama, random bases, ranks.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from loki_fixtures import HEAD_DIM, synthetic_model_run
from typer.testing import CliRunner

from keyspace.cli.main import app


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    return root, synthetic_model_run(root)


def invoke(root, run, *args):
    base = [
        "validate",
        "--run",
        str(run),
        "--dataset",
        str(root / "corpus.txt"),
        "--window",
        "64",
        "--max-tokens",
        "128",
    ]
    return CliRunner().invoke(app, [*base, *args])


def test_sweep_writes_validate_json_and_report(synthetic):
    root, run = synthetic
    out = root / "out"
    result = invoke(
        root,
        run,
        "--d",
        "4,auto:0.9",
        "--k",
        "0.25",
        "--k-mode",
        "window,row",
        "--decode-prompts",
        "0",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "validate.json").read_text())
    written = {p.name for p in out.iterdir()}
    assert {"validate.html", "validate_pareto-window.png", "validate_pareto-row.png"} <= written
    assert any(n.startswith("validate_recall_vs_key_rank-") for n in written)
    assert any(n.startswith("validate_recall_per_layer-") for n in written)
    rows = doc["results"]
    assert {r["method"] for r in rows} == {
        "loki",
        "full",
        "exact-topk",
        "h2o",
        "pcaattn",
        "sparq",
        "streaming",
    }
    # loki and sparq: 2 d × 2 modes; exact-topk, h2o, streaming: 2 modes; pcaattn: 2 d; full: 1
    assert len(rows) == 4 + 4 + 2 + 2 + 2 + 2 + 1
    assert all(r["tokens"] == 128 and r["predicted_tokens"] == 126 for r in rows)
    assert doc["k_modes"] == ["window", "row"]
    loki = next(r for r in rows if r["method"] == "loki" and r["d"] == 4)
    assert loki["kv_bytes_fraction"] == pytest.approx((4 + 2 * 0.25 * HEAD_DIM) / (2 * HEAD_DIM))
    assert {r["d_mean"] for r in rows if r["d"] == "auto:0.9"} == {
        (4 + 6 + 9 + 13) / 4
    }  # post ranks
    recall = doc["recall"]
    assert [(e["d"], e["k"]) for e in recall] == [(4, 0.25), ("auto:0.9", 0.25)]
    for entry in recall:
        assert len(entry["mass_recall"]) == 2 and len(entry["mass_recall"][0]) == 4
        assert all(0.0 <= m <= 1.0 for row in entry["mass_recall"] for m in row)
        assert entry["rank"] == [
            [4, 4, 6, 6],
            [9, 9, 13, 13],
        ]  # each query head gets its KV head's rank
        assert -1.0 <= entry["spearman_rank_vs_mass"]["rho"] <= 1.0
        assert -1.0 <= entry["spearman_rank_vs_relative_mass"]["rho"] <= 1.0
        # the exact top-k holds the most mass any set of that size can: Loki's share is at most it
        for loki_row, exact_row, relative_row in zip(
            entry["mass_recall"],
            entry["exact_topk_mass"],
            entry["relative_mass_recall"],
            strict=True,
        ):
            for loki, exact, relative in zip(loki_row, exact_row, relative_row, strict=True):
                assert loki <= exact + 1e-9 and relative == pytest.approx(loki / exact)
    html = (out / "validate.html").read_text()
    assert "exact-topk" in html and "data:image/png;base64," in html
    assert 'src="validate_' not in html  # images are inlined: the page stands alone
    assert "mass / exact top-k mass" in html and f"{recall[0]['rows']}</td>" in html


def test_group_select_runs_and_is_recorded(synthetic):
    root, run = synthetic
    args = [
        "--d",
        "4",
        "--methods",
        "loki",
        "--gqa-select",
        "group",
        "--decode-prompts",
        "1",
        "--decode-tokens",
        "2",
    ]
    result = invoke(root, run, *args, "--out", str(root / "o4"), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["gqa_select"] == "group" and doc["decode"][0]["gqa_select"] == "group"
    mass = doc["recall"][0]["mass_recall"]
    assert len(mass[0]) == 4


def test_full_rank_k1_matches_full_perplexity(synthetic):
    root, run = synthetic
    result = invoke(
        root,
        run,
        "--d",
        str(HEAD_DIM),
        "--k",
        "1.0",
        "--methods",
        "loki,full,exact-topk",
        "--decode-prompts",
        "0",
        "--out",
        str(root / "o2"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r["ppl"] for r in json.loads(result.stdout)["results"]}
    assert rows["loki"] == pytest.approx(rows["full"], rel=1e-4)
    assert rows["exact-topk"] == pytest.approx(rows["full"], rel=1e-4)
    recall = json.loads(result.stdout)["recall"][0]
    assert (
        recall["rows"] == 0 and recall["mass_recall"][0][0] == 1.0
    )  # k=1 keeps every row's whole context


def test_table_output_without_json_with_decode_and_passkey(synthetic):
    root, run = synthetic
    args = [
        "--d",
        "4",
        "--k",
        "0.25,0.5",
        "--methods",
        "loki,full",
        "--decode-prompts",
        "1",
        "--decode-tokens",
        "3",
    ]
    result = invoke(
        root,
        run,
        *args,
        "--passkey-lengths",
        "64",
        "--passkey-count",
        "2",
        "--out",
        str(root / "o3"),
    )
    assert result.exit_code == 0, result.output
    assert (
        "loki" in result.stdout
        and "Spearman" in result.stdout
        and "token agreement" in result.stdout
    )
    doc = json.loads((root / "o3" / "validate.json").read_text())
    assert [(e["d"], e["k"], e["prompts"], e["tokens"]) for e in doc["decode"]] == [
        (4, 0.25, 1, 3),
        (4, 0.5, 1, 3),
    ]
    assert all(
        0.0 <= e["token_agreement"] <= 1.0 and 0.0 <= e["forced_agreement"] <= 1.0
        for e in doc["decode"]
    )
    expected = [("full", None, 64, 2), ("loki", 0.25, 64, 2), ("loki", 0.5, 64, 2)]
    assert [(e["method"], e["k"], e["length"], e["count"]) for e in doc["passkey"]] == expected
    assert "Passkey retrieval" in (root / "o3" / "validate.html").read_text()
    assert doc["tasks"] == [] and doc["task_setup"] is None  # no --tasks: no task stage


def test_tasks_write_one_row_per_method_setting_task_and_length(synthetic):
    root, run = synthetic
    out = root / "o5"
    args = ["--d", "4", "--k", "0.25", "--methods", "loki,full,h2o", "--decode-prompts", "0"]
    args += ["--recall-windows", "0", "--tasks", "niah", "--task-lengths", "96,128"]
    result = invoke(root, run, *args, "--task-count", "2", "--task-batch", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "validate.json").read_text())
    variants = [("full", None, None, None), ("loki", 4, 0.25, "key"), ("h2o", None, 0.25, None)]
    assert [
        (r["method"], r["d"], r["k"], r["basis"], r["task"], r["length"]) for r in doc["tasks"]
    ] == [(*v, "niah", n) for n in (96, 128) for v in variants]
    keys = {"method", "d", "k", "task", "length", "accuracy", "ci_low", "ci_high", "count"}
    paired = {"vs_full", "vs_full_low", "vs_full_high"}
    for row in doc["tasks"]:
        extra = set() if row["method"] == "full" else paired
        assert set(row) == keys | {"basis", "k_budget", "scoring", "scores"} | extra
        assert row["count"] == 2 and row["scoring"] == "exact" and len(row["scores"]) == 2
        if extra:
            assert row["vs_full_low"] <= row["vs_full"] <= row["vs_full_high"]
        assert 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1.0
    assert doc["task_setup"] == {
        "tasks": ["niah"], "lengths": [96, 128], "count": 2, "haystack": "filler", "seed": 0,
        "batch": 2,
    }  # fmt: skip
    assert "long-context tasks" in result.stdout and "h2o" in result.stdout
    h2o_line = next(x for x in result.stdout.splitlines() if " h2o " in x and "niah" in x)
    h2o_row = next(r for r in doc["tasks"] if r["method"] == "h2o")
    assert f"{h2o_row['vs_full']:+.2f}" in h2o_line and "1/4" in h2o_line  # vs full; k as 1/4
    assert "Long-context tasks" in (out / "validate.html").read_text()
    assert (out / "validate_tasks.png").is_file()


def test_select_adaptive_adds_one_loki_adaptive_row_per_loki_row(synthetic):
    """--select fixed,adaptive: loki-adaptive at loki's (d, k, basis) in perplexity, the decode
    check, passkey and tasks (through its cache), the printed table and the report."""
    root, run = synthetic
    out = root / "o-select"
    args = ["--d", "4", "--k", "0.25", "--k-mode", "row", "--methods", "loki,full"]
    args += ["--select", "fixed,adaptive", "--decode-prompts", "1", "--decode-tokens", "3"]
    args += ["--passkey-lengths", "64", "--passkey-count", "1", "--recall-windows", "0"]
    args += ["--tasks", "niah", "--task-lengths", "96", "--task-count", "1", "--out", str(out)]
    result = invoke(root, run, *args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "validate.json").read_text())
    assert [(r["method"], r["d"], r["k"], r["basis"]) for r in doc["results"]] == [
        ("loki", 4, 0.25, "key"), ("loki-adaptive", 4, 0.25, "key"), ("full", None, None, None),
    ]  # fmt: skip
    adaptive = doc["results"][1]
    assert adaptive["ppl"] != doc["results"][0]["ppl"]  # another selection, measured
    for stage in ("decode", "passkey", "tasks"):
        assert "loki-adaptive" in [e["method"] for e in doc[stage]], stage
    assert [e["method"] for e in doc["decode"]] == ["loki", "loki-adaptive"]
    table = [line for line in result.stdout.splitlines() if "loki-adaptive" in line]
    assert any(f"{adaptive['ppl']:.3f}" in line for line in table)
    assert "loki-adaptive" in (out / "validate.html").read_text()
    alone = invoke(root, run, "--d", "4", "--k", "0.25", "--k-mode", "row", "--methods",
                   "loki,full", "--select", "adaptive", "--decode-prompts", "0",
                   "--recall-windows", "0", "--json")  # fmt: skip
    assert alone.exit_code == 0, alone.output
    rows = json.loads(alone.stdout)["results"]
    assert [r["method"] for r in rows] == ["loki-adaptive", "full"]
    assert rows[0]["ppl"] == pytest.approx(adaptive["ppl"], rel=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--select", "magic"], "--select must be fixed, adaptive or both"),
        (["--select", ","], "--select must be fixed, adaptive or both"),
        (["--select", "adaptive", "--methods", "full"], "--methods has no loki"),
        (["--d", "17"], "--d must be a whole number from 1 to 16, or auto:τ"),
        (["--d", "0"], "--d must be a whole number from 1 to 16"),
        (["--d", "x"], "--d must be a whole number from 1 to 16"),
        (["--k", "0"], "--k must be a fraction in (0, 1]"),
        (["--k", "1.5"], "--k must be a fraction in (0, 1]"),
        (["--k", "nan"], "--k must be a fraction in (0, 1]"),
        (["--k", "0.25,١"], "--k must be a fraction in (0, 1]"),
        (["--d", "auto:0.8"], "no post ranks at τ=0.8"),
        (["--methods", "loki,magic"], "unknown --methods value 'magic'"),
        (["--k-mode", "column"], "unknown --k-mode value"),
        (["--rotary", "mid"], "--rotary must be pre or post"),
        (["--gqa-select", "all"], "--gqa-select must be head or group"),
        (["--basis", "magic"], "--basis must be key, query-aware or both"),
        (["--basis", "key,magic"], "--basis must be key, query-aware or both"),
        (["--recall-windows", "-1"], "--recall-windows must be a whole number from 0 to"),
        (["--decode-prompts", "3"], "3 decode prompts of 128 tokens need 384 tokens"),
        (["--window", "1"], "--window must be a whole number from 2 to"),
        (["--passkey-lengths", "99999"], "exceeds the model's limit of 512"),
        (["--passkey-lengths", "2k"], "--passkey-lengths must be a whole number from 1 to"),
        (["--tasks", "niah,magic"], "unknown --tasks value 'magic'"),
        (["--tasks", "niah", "--task-lengths", "1024"], "1024 exceeds the model's limit of 512"),
        (["--tasks", "default", "--task-lengths", "96"], "too short for niah-uuid"),
        (
            ["--tasks", "niah", "--task-lengths", "0"],
            "--task-lengths must be a whole number from 1",
        ),
        (["--task-haystack", "nowhere"], "--task-haystack 'nowhere' is not filler"),
        (["--task-count", "0"], "--task-count must be a whole number from 1 to"),
    ],
)
def test_bad_input_is_one_error_line_with_exit_code_2(synthetic, args, message):
    root, run = synthetic
    result = invoke(root, run, *args)
    assert result.exit_code == 2, result.output
    assert (
        result.stderr.startswith("Error: ")
        and message in result.stderr
        and "Hint: " in result.stderr
    )
    assert "Traceback" not in result.output


def test_run_without_calibration_or_ranks_or_with_another_models_calibration(tmp_path):
    bare = synthetic_model_run(tmp_path / "a", with_calibration=False, with_ranks=False)
    result = invoke(tmp_path / "a", bare)
    assert result.exit_code == 2 and "keyspace analyze" in result.stderr
    # A calibration without the ranks document that records its hash is not trusted.
    unsealed = synthetic_model_run(tmp_path / "b", with_ranks=False)
    result = invoke(tmp_path / "b", unsealed, "--d", "4")
    assert result.exit_code == 2 and "keyspace analyze" in result.stderr
    other = synthetic_model_run(tmp_path / "c", identity="weights:someone-else")
    result = invoke(tmp_path / "c", other, "--d", "4")
    assert (
        result.exit_code == 2
        and "weights:someone-else" in result.stderr
        and "Hint:" in result.stderr
    )


def test_calibration_identity_must_match_the_run(synthetic, tmp_path):
    import shutil

    from keyspace.analyze.pca import write_ranks
    from keyspace.runfolder.analysis import read_calibration, read_ranks

    root, run = synthetic
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    calibration = read_calibration(copy)
    calibration.metadata["model_identity"] = "gguf:another-model"
    ranks = read_ranks(copy)
    ranks["calibration_sha256"] = calibration.save(copy / "calibration.safetensors")
    write_ranks(copy, ranks)
    result = invoke(root, copy, "--d", "4")
    assert result.exit_code == 2 and "calibrated on gguf:another-model" in result.stderr


@pytest.mark.parametrize(
    "error, where",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 112.17 GiB."), "GPU"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate "
                      "memory: you tried to allocate 120259084288 bytes."), "CPU"),
    ],
)  # fmt: skip
def test_out_of_memory_in_the_tasks_is_one_line_naming_task_batch(
    synthetic, monkeypatch, error, where
):
    import keyspace.validate.stages as stages

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(stages, "run_tasks", exhausted)
    root, run = synthetic
    args = ["--d", "4", "--k", "0.25", "--methods", "loki,full", "--decode-prompts", "0"]
    args += ["--recall-windows", "0", "--tasks", "niah", "--task-lengths", "96"]
    result = invoke(root, run, *args, "--task-batch", "10", "--out", str(root / f"oom-{where}"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"Error: out of {where} memory decoding 10 task prompts of up to 96"
    )
    assert "--task-batch 2" in lines[-1] and "Traceback" not in result.output
    assert not (root / f"oom-{where}" / "validate.json").exists()  # nothing half-written


def test_other_runtime_errors_in_the_tasks_are_not_called_out_of_memory(synthetic, monkeypatch):
    import keyspace.validate.stages as stages

    def broken(*args, **kwargs):
        raise RuntimeError("shape '[2, 3]' is invalid for input of size 5")

    monkeypatch.setattr(stages, "run_tasks", broken)
    root, run = synthetic
    args = ["--d", "4", "--k", "0.25", "--methods", "loki,full", "--decode-prompts", "0"]
    args += ["--recall-windows", "0", "--tasks", "niah", "--task-lengths", "96"]
    result = invoke(root, run, *args, "--out", str(root / "broken"))
    assert isinstance(result.exception, RuntimeError) and "memory" not in result.output


@pytest.mark.parametrize("flag, timed", [("--speed", True), ("--no-speed", False)])
def test_no_speed_skips_both_timings(synthetic, monkeypatch, flag, timed):
    import keyspace.validate.run as run_module

    calls = []

    def timing(name):
        def measure(*args, **kwargs):
            calls.append(name)  # on this CPU the real ones return None too

        return measure

    monkeypatch.setattr(run_module, "measured_speed", timing("speed"))
    monkeypatch.setattr(run_module, "measured_decode", timing("decode"))
    root, run = synthetic
    args = ["--d", "4", "--k", "0.25", "--methods", "loki,full", "--decode-prompts", "0"]
    out = root / f"speed-{timed}"
    result = invoke(root, run, *args, "--recall-windows", "0", flag, "--out", str(out))
    assert result.exit_code == 0, result.output
    speed = json.loads((out / "validate.json").read_text())["speed"]
    assert calls == (["speed", "decode"] if timed else [])
    assert speed["measured"] is None and speed["decode"] is None


# ---- the three promised commands, in an empty folder -------------------------------------------


def keyspace_in(folder, *args: str):
    """`keyspace ARGS` as a user types it, in `folder`, with nothing set up."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "keyspace", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "KEYSPACE_NO_PROGRESS": "1"},
    )


def test_the_three_promised_lines_run_verbatim_in_an_empty_folder(tmp_path):
    """collect without --out, then rank-report and validate with no run: the README's tour with a
    tiny model and corpus standing in for smollm2-135m and wikitext."""
    from tiny_models import save_tiny_model, write_corpus

    # head_dim 32 so that --d 32 is the full dimension; positions for 1024-token windows
    model = save_tiny_model(tmp_path / "tiny", hidden_size=64, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=2048)  # fmt: skip
    corpus = write_corpus(tmp_path / "words.txt", repeats=30)
    home = tmp_path / "home"
    home.mkdir()

    none_yet = keyspace_in(home, "rank-report")
    assert none_yet.returncode == 2
    assert none_yet.stderr.startswith("Error: no run folder given")
    assert "keyspace collect --model smollm2-135m --dataset wikitext" in none_yet.stderr
    assert len(none_yet.stderr.strip().splitlines()) == 1

    collected = keyspace_in(home, "collect", "--model", str(model), "--dataset", str(corpus),
                            "--max-tokens", "2048")  # fmt: skip
    assert collected.returncode == 0, collected.stderr
    assert "runs/tiny-words" in collected.stdout
    run = home / "runs" / "tiny-words"
    assert json.loads((run / "manifest.json").read_text())["state"] == "complete"

    reported = keyspace_in(home, "rank-report")
    assert reported.returncode == 0, reported.stderr
    assert "Using the most recent complete run, runs/tiny-words" in reported.stderr
    assert "Pass RUN to pick another" in reported.stderr
    assert (home / "reports" / "tiny-words" / "index.html").is_file()

    validated = keyspace_in(home, "validate", "--d", "32", "--k", "0.125")
    assert validated.returncode == 0, validated.stderr
    assert "Using the most recent complete run, runs/tiny-words" in validated.stderr
    assert "Pass --run RUN to pick another" in validated.stderr
    assert (run / "validate" / "validate.html").is_file()


def test_the_newest_complete_run_is_taken_and_partial_ones_are_passed_over(tmp_path, monkeypatch):
    import os
    import shutil

    from keyspace.cli.defaults import complete_runs, default_run_folder, latest_run
    from keyspace.errors import KeyspaceError
    from keyspace.runfolder.store import write_manifest

    assert default_run_folder("smollm2-135m", "wikitext", 1024).as_posix() == (
        "runs/smollm2-135m-wikitext"
    )
    assert default_run_folder("/m/tiny/", "/c/words.txt", 512).as_posix() == "runs/tiny-words-w512"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyspaceError, match="there is no runs/ folder"):
        latest_run("RUN")
    made = synthetic_model_run(tmp_path / "made")
    runs = tmp_path / "runs"
    for age, name in enumerate(("new", "old", "partial")):
        shutil.copytree(made, runs / name)
        os.utime(runs / name / "manifest.json", (1e9 - age, 1e9 - age))
    (runs / "not-a-run").mkdir()
    manifest = json.loads((runs / "partial" / "manifest.json").read_text())
    write_manifest(runs / "partial", {**manifest, "state": "partial"})
    os.utime(runs / "partial" / "manifest.json", (2e9, 2e9))  # newest, but partial
    assert complete_runs() == [Path("runs/new"), Path("runs/old")]
    run, note = latest_run("--run RUN")
    assert run == Path("runs/new") and "newest of 2" in note and "--run RUN" in note
    shutil.rmtree(runs / "new")
    shutil.rmtree(runs / "old")
    with pytest.raises(KeyspaceError, match="runs/ has no complete run"):
        latest_run("RUN")
