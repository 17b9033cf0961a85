"""benchmarks/tasks_table.py: the markdown table the task notes quote, from validate.json rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tasks_table.py"


def row(method, d, k, basis, task, length, accuracy, low, high):
    return {"method": method, "d": d, "k": k, "basis": basis, "task": task, "length": length,
            "accuracy": accuracy, "ci_low": low, "ci_high": high, "count": 50}  # fmt: skip


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"tasks": rows}))
    return path


def table(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True
    )


def test_rows_are_variants_columns_are_task_and_length_missing_cells_are_dashes(tmp_path):
    a = write(tmp_path / "a.json", [
        row("full", None, None, None, "niah", 4096, 1.0, 0.93, 1.0),
        row("loki", 32, 0.125, "key", "niah", 4096, 0.5, 0.37, 0.63),
    ])  # fmt: skip
    b = write(
        tmp_path / "b.json", [row("full", None, None, None, "mv-niah", 8192, 0.315, 0.27, 0.36)]
    )
    done = table(a, b)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "| method | niah @ 4096 | mv-niah @ 8192 |"
    assert lines[2] == "| full | 1.00 [0.93, 1.00] | 0.32 [0.27, 0.36] |"
    assert lines[3] == "| loki d=32, k=1/8 | 0.50 [0.37, 0.63] | - |"
    assert len(lines) == 4


def test_labels_keep_the_same_variant_from_two_files_apart(tmp_path):
    one = row("loki", 16, 0.125, "query-aware", "niah-uuid", 8192, 0.0, 0.0, 0.07)
    a = write(tmp_path / "a.json", [one])
    b = write(tmp_path / "b.json", [{**one, "accuracy": 0.58, "ci_low": 0.44, "ci_high": 0.71}])
    lines = table(a, b, "--labels", "1024,8192").stdout.splitlines()
    assert lines[2:] == [
        "| 1024: loki (query-aware) d=16, k=1/8 | 0.00 [0.00, 0.07] |",
        "| 8192: loki (query-aware) d=16, k=1/8 | 0.58 [0.44, 0.71] |",
    ]
    # without labels the second file's cell replaces the first's: one row
    assert len(table(a, b).stdout.splitlines()) == 3


def test_a_label_count_that_does_not_match_the_files_is_a_usage_error(tmp_path):
    a = write(tmp_path / "a.json", [row("full", None, None, None, "niah", 4096, 1.0, 0.93, 1.0)])
    done = table(a, "--labels", "x,y")
    assert done.returncode == 2
    assert "--labels has 2 names for 1 files" in done.stderr


def test_filters_keep_methods_k_and_tasks_and_order_the_columns(tmp_path):
    a = write(tmp_path / "a.json", [
        row("full", None, None, None, "niah", 4096, 1.0, 0.93, 1.0),
        row("loki", 32, 0.125, "key", "niah", 4096, 0.5, 0.37, 0.63),
        row("loki", 32, 0.25, "key", "niah", 4096, 0.6, 0.46, 0.72),
        row("h2o", None, 0.125, None, "niah", 4096, 0.1, 0.04, 0.21),
        row("full", None, None, None, "mv-niah", 4096, 0.5, 0.4, 0.6),
        row("full", None, None, None, "vt", 4096, 0.2, 0.1, 0.3),
    ])  # fmt: skip
    done = table(a, "--methods", "full,loki", "--k", "0.125", "--tasks", "mv-niah,niah")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "| method | mv-niah @ 4096 | niah @ 4096 |",
        "|---|---|---|",
        "| full | 0.50 [0.40, 0.60] | 1.00 [0.93, 1.00] |",
        "| loki d=32, k=1/8 | - | 0.50 [0.37, 0.63] |",
    ]
