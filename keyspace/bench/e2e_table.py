"""The end-to-end bench's presentation: one log line per row, the markdown table, the saved files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from keyspace.bench.dense import E2E_DENSE_BACKEND
from keyspace.runfolder.files import dumps_json


def save_result(result: dict, folder: Path) -> None:
    """Write a sweep as e2e.json (everything) and e2e.md (the table)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "e2e.json").write_text(dumps_json(result, indent=2, default=str))
    (folder / "e2e.md").write_text(markdown_table(result["rows"]) + "\n")


def _label(row: dict) -> str:
    """'dense', 'Loki d=32 k=0.125' or, for a token budget, 'Loki d=32 2048 tok'."""
    if row["method"] == "dense":
        label = "dense"
    elif row.get("k_budget") is not None:
        label = f"Loki d={row['d']} {row['k_budget']} tok"
    else:
        label = f"Loki d={row['d']} k={row['k']:g}"
    return f"{label} [{row['variant']}]" if row.get("variant") else label


def format_row(row: dict) -> str:
    label = _label(row)
    if row["method"] == "dense":  # the log names the dense attention the dense loop runs
        label = label.replace("dense", f"dense ({E2E_DENSE_BACKEND})", 1)
    return (
        f"B={row['batch']} S={row['seq']} {label}: {row['step_ms']:.2f} ms/step, "
        f"{row['tokens_per_s']:.0f} tok/s, {row['floor_pct']:.0f}% of floor, "
        f"{row.get('speedup_vs_dense', float('nan')):.2f}x dense"
    )


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per row: step time, tokens/s, the byte floor and % reached, the split, speedups."""

    def cell(row, key, fmt):
        value = row.get(key)
        return "–" if value is None else format(value, fmt)

    head = (
        "| B | S | method | prefill s | step ms | tok/s | floor ms | % floor | attention ms "
        f"(floor) | rest ms (floor) | × dense loop ({E2E_DENSE_BACKEND}) | generate ms "
        "| × generate | peak GB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        attention = f"{cell(r, 'attention_ms', '.2f')} ({cell(r, 'attention_floor_ms', '.2f')})"
        rest = f"{cell(r, 'rest_ms', '.2f')} ({cell(r, 'rest_floor_ms', '.2f')})"
        lines.append(
            f"| {r['batch']} | {r['seq']} | {_label(r)} | {cell(r, 'prefill_s', '.1f')} "
            f"| {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['floor_ms']:.2f} "
            f"| {r['floor_pct']:.0f}% | {attention} | {rest} | {cell(r, 'speedup_vs_dense', '.2f')}× "
            f"| {cell(r, 'generate_step_ms', '.1f')} | {cell(r, 'speedup_vs_generate', '.1f')}× "
            f"| {cell(r, 'peak_gb', '.1f')} |"
        )
    return "\n".join(lines)
