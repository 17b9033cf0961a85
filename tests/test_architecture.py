"""The package's imports point one way down the pipeline, and form no cycle.

Every import of a keyspace module counts, also those inside functions (the CLI imports its stages
lazily so `keyspace --help` stays instant; the arrows are the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "keyspace"

# unit -> the units it may import. A unit is a subpackage or a top-level module of keyspace; the
# list reads as the pipeline: collect -> runfolder -> analyze -> reports, and
# cli -> validate -> loki -> kernels.
ALLOWED = {
    "keyspace": {"loki"},  # `keyspace.Loki`, imported lazily on first use
    "errors": set(),
    "options": {"errors"},
    "models": {"errors", "runfolder"},
    "runfolder": {"keyspace", "errors"},
    "collect": {"keyspace", "errors", "options", "runfolder", "models"},
    "analyze": {"keyspace", "errors", "runfolder"},
    "reports": {"errors", "runfolder", "analyze", "loki"},  # loki: the methods' plot styles
    "kernels": set(),
    "loki": {"errors", "kernels", "models", "runfolder"},
    "tasks": {"errors", "collect", "loki"},
    "bench": {"errors", "kernels", "loki", "models", "runfolder"},  # runfolder: strict JSON
    "validate": {
        "keyspace",
        "errors",
        "options",
        "runfolder",
        "analyze",
        "collect",
        "models",
        "loki",
        "bench",
        "reports",
        "tasks",
    },
    "cli": {
        "errors",
        "options",
        "runfolder",
        "analyze",
        "collect",
        "models",
        "reports",
        "bench",
        "validate",
    },
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "keyspace"


def imports_of(path: Path) -> set[str]:
    """Every keyspace module `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "keyspace"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "keyspace":
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_unit_is_declared():
    units = {unit_of(m) for m in import_graph()}
    assert units <= set(ALLOWED), f"declare these units in ALLOWED: {units - set(ALLOWED)}"


def test_imports_point_down_the_pipeline():
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if unit_of(target) != unit_of(module) and unit_of(target) not in ALLOWED[unit_of(module)]
    ]
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("lower", ["loki", "kernels", "reports", "bench"])
def test_lower_layers_never_import_validate_or_cli(lower):
    for module, targets in import_graph().items():
        if unit_of(module) == lower:
            assert not {unit_of(t) for t in targets} & {"validate", "cli"}, module


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target] if target in trail else [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_back_edge(tmp_path):
    """The walk finds imports inside functions: a lazy back-edge would not hide from it."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from keyspace.cli.main import app\n")
    assert imports_of(source) == {"keyspace.cli.main"}


def test_run_folder_names_live_in_store_only():
    names = ("manifest.json", "moments.safetensors", "ranks.json", "calibration.safetensors")
    for path in PACKAGE.rglob("*.py"):
        if module_name(path).startswith("keyspace.runfolder."):
            continue
        text = path.read_text()
        assert not [n for n in names if n in text], f"{path} names a run-folder file"
