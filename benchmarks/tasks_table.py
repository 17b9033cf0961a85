"""One markdown table from the `tasks` rows of one or more validate.json files.

    .venv/bin/python benchmarks/tasks_table.py results/tasks-smollm2-h200-4096.json \
        results/tasks-smollm2-h200-8192-niah.json

Rows are the variants (method, basis, d, k) in the files' order; columns are (task, length) in
the order they first appear; each cell is "accuracy [ci_low, ci_high]", "-" where not measured.
`--labels a,b,...` names each file (say, its calibration); rows are then (label, variant), so
the same variant from runs that differ in something outside the rows stays apart. `--methods`,
`--k` and `--tasks` keep only those rows (full has no k and is kept by `--k`); `--tasks` also
orders the columns.
This wrote the tables of docs/notes/tasks-h200-smollm2.md and docs/validate.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keyspace.reports.validate_figures import task_variant


def row_name(row: dict) -> str:
    label = row.get("_label")
    return task_variant(row) if label is None else f"{label}: {task_variant(row)}"


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    variants = list(dict.fromkeys(row_name(r) for r in rows))
    cells = {(row_name(r), r["task"], r["length"]): r for r in rows}
    lines = [
        "| method | " + " | ".join(f"{task} @ {length}" for task, length in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for variant in variants:
        values = []
        for task, length in columns:
            r = cells.get((variant, task, length))
            values.append(
                "-" if r is None else f"{r['accuracy']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            )
        lines.append(f"| {variant} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="validate.json files with tasks rows")
    parser.add_argument("--labels", help="comma-separated, one per file: prefixes its rows")
    parser.add_argument("--methods", help="comma-separated methods to keep, e.g. full,loki")
    parser.add_argument("--k", type=float, help="keep the rows at this k (and full)")
    parser.add_argument("--tasks", help="comma-separated tasks to keep, in column order")
    args = parser.parse_args()
    labels = [None] * len(args.files) if args.labels is None else args.labels.split(",")
    if len(labels) != len(args.files):
        parser.error(f"--labels has {len(labels)} names for {len(args.files)} files")
    rows = [
        {**r, "_label": label}
        for f, label in zip(args.files, labels, strict=True)
        for r in json.loads(f.read_text())["tasks"]
    ]
    if args.methods:
        rows = [r for r in rows if r["method"] in args.methods.split(",")]
    if args.k is not None:
        rows = [r for r in rows if r["k"] in (None, args.k)]
    if args.tasks:
        order = args.tasks.split(",")
        rows = sorted((r for r in rows if r["task"] in order), key=lambda r: order.index(r["task"]))
    print(markdown(rows))


if __name__ == "__main__":
    main()
