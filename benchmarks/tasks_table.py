"""One markdown table from the `tasks` rows of one or more validate.json files.

    .venv/bin/python benchmarks/tasks_table.py results/tasks-smollm2-h200-4096.json \
        results/tasks-smollm2-h200-8192-niah.json

Rows are the variants (method, basis, d, k) in the files' order; columns are (task, length) in
the order they first appear; each cell is "accuracy [ci_low, ci_high]", "-" where not measured.
This wrote the tables of docs/notes/tasks-h200-smollm2.md and docs/validate.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keyspace.reports.validate_figures import task_variant


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    variants = list(dict.fromkeys(task_variant(r) for r in rows))
    cells = {(task_variant(r), r["task"], r["length"]): r for r in rows}
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
    args = parser.parse_args()
    rows = [r for f in args.files for r in json.loads(f.read_text())["tasks"]]
    print(markdown(rows))


if __name__ == "__main__":
    main()
