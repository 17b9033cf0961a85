"""Where a command looks when the user names no folder: the run folder `collect` writes by default
(`runs/<model>-<dataset>`), and the run `rank-report` and `validate` take without one (the most
recent complete run under `./runs`). The runs are read with RunFolder, the run folder's one reader.
"""

from __future__ import annotations

import re
from pathlib import Path

from keyspace.collect.config import AUTO_WINDOW_LENGTHS, window_label
from keyspace.errors import KeyspaceError

RUNS = Path("runs")
# What the auto --window can give (1024+8192, or 1024 at a small --max-tokens): a run at another
# window says so in its name.
DEFAULT_WINDOWS = (window_label(AUTO_WINDOW_LENGTHS), AUTO_WINDOW_LENGTHS[0])
FIRST_COLLECT = "keyspace collect --model smollm2-135m --dataset wikitext --max-tokens 4096"


def _slug(spec: str) -> str:
    """'smollm2-135m' stays; a path or hub id becomes its last part without suffix."""
    name = spec.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"\.(gguf|txt|jsonl|parquet)$", "", name) or "run"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def default_run_folder(model: str, dataset: str, window: int | str | None) -> Path:
    """runs/<model>-<dataset>, plus -w<window> when the window (a label: 2048, "1024+8192") is
    none the auto --window gives; None is the auto --window itself."""
    name = f"{_slug(model)}-{_slug(dataset)}"
    if window is not None and window not in DEFAULT_WINDOWS:
        name += f"-w{window}"
    return RUNS / name


def complete_runs(root: Path = RUNS) -> list[Path]:
    """The complete runs directly under `root`, newest manifest first. A folder that is no run,
    a partial run or a damaged one is passed over: it is not a run to report on."""
    from keyspace.runfolder.store import MANIFEST, RunFolder

    found = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        try:
            run = RunFolder.open(folder)
        except KeyspaceError:
            continue
        if run.is_complete:
            found.append((run.path.joinpath(MANIFEST).stat().st_mtime, folder))
    return [folder for _, folder in sorted(found, key=lambda pair: -pair[0])]


def latest_run(option: str) -> tuple[Path, str]:
    """(the most recent complete run under ./runs, a line saying so and how to pick another).

    option: how the command names a run ('--run RUN' or 'RUN'), for the line and the error."""
    runs = complete_runs()
    if not runs:
        where = f"{RUNS}/ has no complete run" if RUNS.is_dir() else f"there is no {RUNS}/ folder"
        raise KeyspaceError(
            f"no run folder given, and {where} here.",
            f"Collect one first with `{FIRST_COLLECT}`, or pass {option}.",
        )
    count = f" (newest of {len(runs)} under {RUNS}/)" if len(runs) > 1 else ""
    return runs[
        0
    ], f"Using the most recent complete run, {runs[0]}{count}. Pass {option} to pick another."
