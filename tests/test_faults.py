"""Fault injection: every command, fed damaged runs and damaged inputs, ends in one clean line.

Categories, each applied to every file a command reads (a run written by the real collect and
analyze on a tiny random Llama):
  damaged run     flipped bytes, truncation, deletion, garbage appended, a folder in a file's
                  place, and JSON that is invalid, of the wrong type, or edited by hand
  damaged input   corpora with bad encodings, wrong JSON types in .jsonl, garbage .parquet,
                  broken model folders
  output folder   a file where the folder should be, a folder under a file, a read-only folder,
                  a full disk, Ctrl-C

Outcomes:
  error      exit 2, exactly one `Error: ... Hint: ...` line on stderr, and nothing marked
             complete that is not (no complete manifest, new analysis, validate.json or report)
  repaired   exit 0, and `verify` passes afterwards with the original moments and shards:
             `collect --resume` recomputes what is damaged; rank-report re-analyzes a run whose
             analysis is gone
  traceback  an uncaught exception: must never happen
  accepted   exit 0 on damaged data the command read, without repairing it: must never happen

`pytest tests/test_faults.py -s` prints each command's counts (its row of the table); with
KEYSPACE_FAULTS_SHOW=1 also every case's outcome and message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import Result
from safetensors.torch import load_file
from tiny_models import save_tiny_model, write_corpus
from typer.testing import CliRunner

from keyspace.analyze.pca import analyze_and_write
from keyspace.cli.main import app
from keyspace.collect.runner import CollectConfig, collect
from keyspace.errors import KeyspaceError
from keyspace.runfolder.verify import verify_run

WINDOW = 32
MANIFEST, MOMENTS = "manifest.json", "moments.safetensors"
RANKS, CALIBRATION = "ranks.json", "calibration.safetensors"
SHARD = "keys/post/layer01/r0-00001.safetensors"
PROGRESS = "progress/rank0.json"
RANK_MOMENTS = "progress/moments.rank0.c00003.safetensors"
RUN_FILES = (MANIFEST, MOMENTS, SHARD, PROGRESS, RANK_MOMENTS, RANKS, CALIBRATION)
# The run files each command reads; damage to any of them must be refused or repaired.
READS = {
    "collect": (MANIFEST, MOMENTS, SHARD, PROGRESS, RANK_MOMENTS),
    "analyze": (MANIFEST, MOMENTS),
    "rank-report": (MANIFEST, MOMENTS, SHARD, RANKS, CALIBRATION),
    "validate": (MANIFEST, RANKS, CALIBRATION),
    "verify": RUN_FILES,
}
COMMANDS = ("collect", "analyze", "rank-report", "validate", "verify", "bench")


# ---- damage ------------------------------------------------------------------------------------


def _xor(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[min(offset, len(data) - 1)] ^= 0x5A
    path.write_bytes(bytes(data))


def _folder_in_place(path: Path) -> None:
    path.unlink()
    path.mkdir()


BYTES: dict[str, Callable[[Path], None]] = {
    "flipped byte (middle)": lambda p: _xor(p, p.stat().st_size // 2),
    "flipped byte (header)": lambda p: _xor(p, 12),
    "truncated to half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "emptied": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
    "garbage appended": lambda p: p.write_bytes(p.read_bytes() + b"\x00garbage"),
    "a folder in its place": _folder_in_place,
}
# Fewer for collect: each of its cases runs the model again.
COLLECT_BYTES = ("flipped byte (middle)", "truncated to half", "deleted", "a folder in its place")


def _edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        doc = json.loads(path.read_text())
        replaced = edit(doc)
        path.write_text(json.dumps(doc if replaced is None else replaced))

    return apply


def _set(*keys: object, value: object) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        target = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


TEXT_DAMAGE = {
    "not JSON": lambda p: p.write_text('{"state": "comp'),
    "invalid UTF-8": lambda p: p.write_bytes(b'{"\xff\xfe": 1}'),
    "a JSON list": lambda p: p.write_text("[]"),
    "a JSON number": lambda p: p.write_text("5"),
}
JSON_EDITS: dict[str, dict[str, Callable[[Path], None]]] = {
    MANIFEST: {
        "num_layers a string": _edit(_set("num_layers", value="2")),
        "head_dim zero": _edit(_set("head_dim", value=0)),
        "window a string": _edit(_set("window", value="64")),
        "window removed": _edit(lambda m: m.pop("window") and None),
        "state a number": _edit(_set("state", value=5)),
        "state partial": _edit(_set("state", value="partial")),
        "model a string": _edit(_set("model", value="tiny")),
        "shards an object": _edit(_set("shards", value={})),
        "shard sha256 a number": _edit(_set("shards", 0, "sha256", value=5)),
        "shard hash edited": _edit(_set("shards", 0, "sha256", value="0" * 64)),
        "shard path outside the run": _edit(_set("shards", 0, "path", value="../../etc/passwd")),
        "shard layer out of range": _edit(_set("shards", 0, "layer", value=99)),
        "shard entry removed": _edit(lambda m: m["shards"].pop(0) and None),
        "moments record a string": _edit(_set("moments", value="moments")),
        "moments hash edited": _edit(_set("moments", "sha256", value="0" * 64)),
        "moments record removed": _edit(lambda m: m.pop("moments") and None),
    },
    PROGRESS: {
        "chunks_done a string": _edit(_set("chunks_done", value="3")),
        "chunks_done beyond the run": _edit(_set("chunks_done", value=99)),
        "shards a number": _edit(_set("shards", value=5)),
        "shard index a string": _edit(_set("shards", 0, "index", value="0")),
        "moments record removed": _edit(_set("moments", value=None)),
        "moments hash edited": _edit(_set("moments", "sha256", value="0" * 64)),
    },
    RANKS: {
        "a rank edited": _edit(lambda d: d["post"]["rank_at"]["0.9"][0].__setitem__(0, 1)),
        "pre a number": _edit(_set("pre", value=5)),
        "checksum removed": _edit(lambda d: d.pop("content_sha256") and None),
        "calibration hash edited": _edit(_set("calibration_sha256", value="0" * 64)),
        "moments hash edited (stale)": _edit(_set("moments_sha256", value="0" * 64)),
    },
}


def damages(command: str, name: str) -> dict[str, Callable[[Path], None]]:
    """Every damage that applies to the run file `name`, for `command`."""
    chosen = {k: BYTES[k] for k in (COLLECT_BYTES if command == "collect" else BYTES)}
    if name.endswith(".json"):
        text = TEXT_DAMAGE if command != "collect" else {"not JSON": TEXT_DAMAGE["not JSON"]}
        chosen |= text | JSON_EDITS.get(name, {})
    return chosen


# ---- the run, the inputs, the outcome ---------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: threads only wait on each other (100× slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_model(root / "model")
    corpus = write_corpus(root / "corpus.txt", repeats=2)
    cfg = CollectConfig(
        out=root / "run",
        model=str(model),
        dataset=str(corpus),
        window=WINDOW,
        max_tokens=WINDOW * 6,
        keep_keys="all",
        shard_windows=2,
        device="cpu",
    )
    run = collect(cfg).out
    analyze_and_write(run)
    return {"root": root, "model": model, "corpus": corpus, "run": run}


@dataclass
class Case:
    label: str
    args: Callable[[Path], list[str]]  # prepares the case's folder; returns the CLI arguments
    expect: str = "error"
    check: Callable[[Path, Result], str | None] = lambda folder, result: None  # a problem or None
    around: Callable[[Path], contextlib.AbstractContextManager[bool]] = lambda folder: (
        contextlib.nullcontext(True)
    )  # the command runs inside it; it yields False where the fault cannot be made here


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args)


def classify(result: Result) -> str:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "traceback"
    if "Traceback" in result.output:
        return "traceback"
    if result.exit_code == 0:
        return "accepted"
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    if result.exit_code == 2 and len(lines) == 1 and " Hint: " in lines[0]:
        return "error"
    if result.exit_code == 130 and result.stderr.startswith("Interrupted:"):
        return "interrupted"
    return f"unclean exit {result.exit_code}, {len(lines)} Error lines"


def run_cases(command: str, cases: list[Case], tmp_path: Path) -> None:
    """Run every case in its own folder; record the outcomes; fail on any unexpected one."""
    counts, wrong = Counter(), []
    for i, case in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        args = case.args(folder)
        with case.around(folder) as possible:
            if not possible:
                counts["skipped"] += 1
                continue
            result = invoke(args)
        outcome = classify(result)
        if outcome == "accepted" and case.expect == "repaired":
            outcome = "repaired"
        if outcome in ("error", "repaired", "interrupted"):
            try:
                problem = case.check(folder, result)
            except KeyspaceError as err:
                problem = err.message
            outcome = f"{outcome}, but {problem}" if problem else outcome
        if os.environ.get("KEYSPACE_FAULTS_SHOW"):  # to read every message by eye
            print(f"{command} | {case.label} | {outcome} | {result.stderr.strip()[-400:]}")
        counts["cases"] += 1
        known = ("error", "repaired", "interrupted", "traceback", "accepted")
        counts[outcome if outcome in known else "other"] += 1
        if outcome != case.expect:
            wrong.append(
                f"{case.label}: {outcome} (expected {case.expect})\n{result.output[-800:]}"
            )
    print(f"\n{command}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    assert not wrong, "\n".join(wrong)


def copy_run(world: dict, folder: Path) -> Path:
    return Path(shutil.copytree(world["run"], folder / "run"))


def hashes(folder: Path) -> dict[str, str]:
    from keyspace.runfolder.store import sha256_file

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): sha256_file(p) for p in files}


def same_data(world: dict, run: Path) -> str | None:
    """None when `run` verifies and holds the original moments and shards."""
    bad = verify_run(run).bad
    if bad:
        return f"verify still finds {[f.path for f in bad]}"
    a, b = load_file(str(world["run"] / MOMENTS)), load_file(str(run / MOMENTS))
    if any(not (a[k] == b[k]).all() for k in a):
        return "the moments differ from the original"
    shards = {p: h for p, h in hashes(world["run"]).items() if p.startswith("keys/")}
    if shards != {p: h for p, h in hashes(run).items() if p.startswith("keys/")}:
        return "the shards differ from the original"
    return None


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[bool]:
    """Make `folder` unwritable, even for root (chattr +i); yields False where that is impossible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield True
        finally:
            folder.chmod(0o755)
        return
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        yield done
    finally:
        if done:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def full_disk(after: int = 0) -> Iterator[bool]:
    """Every fsync after the first `after` fails with ENOSPC, as on a full disk."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    os.fsync = fsync
    try:
        yield True
    finally:
        os.fsync = real


def output_cases(make_args: Callable[[Path, Path], list[str]], check=None) -> list[Case]:
    """The output folder is a file; is below a file; is read-only."""
    check = check or (lambda folder, result: None)

    def file_out(folder: Path) -> list[str]:
        (folder / "out").write_text("a file")
        return make_args(folder, folder / "out")

    def below_file(folder: Path) -> list[str]:
        (folder / "file").write_text("a file")
        return make_args(folder, folder / "file" / "out")

    return [
        Case("output: a file in its place", file_out, check=check),
        Case("output: below a file", below_file, check=check),
        Case(
            "output: read-only",
            lambda folder: make_args(folder, folder / "ro" / "out"),
            check=check,
            around=lambda folder: read_only(folder / "ro"),
        ),
    ]


def run_damage_cases(
    command: str, world: dict, make_args, expect="error", check=None
) -> list[Case]:
    """Every damage to every run file `command` reads, each on a fresh copy of the run.

    By default the check is that no new analysis came out of damaged data."""
    before: dict[Path, dict[str, str]] = {}

    def untouched(folder: Path, result: Result) -> str | None:
        after = hashes(folder / "run") if (folder / "run").is_dir() else {}
        changed = [
            n for n in (RANKS, CALIBRATION) if n in after and after[n] != before[folder].get(n)
        ]
        return f"it rewrote {changed}" if changed else None

    cases = []
    for name in READS[command]:
        for label, damage in damages(command, name).items():

            def args(folder: Path, name=name, damage=damage) -> list[str]:
                run = copy_run(world, folder)
                damage(run / name)
                before[folder] = hashes(run)
                return make_args(run, folder)

            cases.append(Case(f"{name}: {label}", args, expect, check or untouched))
    return cases


# ---- corpora and models ------------------------------------------------------------------------


def _parquet(path: Path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def _truncated_parquet(path: Path) -> None:
    _parquet(path, text=["some text"] * 50)
    path.write_bytes(path.read_bytes()[:100])


DATASETS: dict[str, Callable[[Path], Path]] = {
    "txt not UTF-8": lambda f: write(f / "c.txt", b"caf\xe9 au lait " * 400),
    "txt empty": lambda f: write(f / "c.txt", b""),
    "jsonl text a number": lambda f: write(f / "c.jsonl", b'{"text": 5}\n'),
    "jsonl text null": lambda f: write(f / "c.jsonl", b'{"text": null}\n'),
    "jsonl line a list": lambda f: write(f / "c.jsonl", b"[1, 2]\n"),
    "jsonl line a string": lambda f: write(f / "c.jsonl", b'"some text"\n'),
    "jsonl no text field": lambda f: write(f / "c.jsonl", b'{"body": "x"}\n'),
    "jsonl not JSON": lambda f: write(f / "c.jsonl", b'{"text": "a"\n'),
    "jsonl not UTF-8": lambda f: write(f / "c.jsonl", b'{"text": "caf\xe9"}\n'),
    "parquet garbage": lambda f: write(f / "c.parquet", b"PAR1 this is not parquet PAR1"),
    "parquet truncated": lambda f: (_truncated_parquet(f / "c.parquet"), f / "c.parquet")[1],
    "parquet text of ints": lambda f: (_parquet(f / "c.parquet", text=[1, 2]), f / "c.parquet")[1],
    "parquet without text": lambda f: (_parquet(f / "c.parquet", body=["x"]), f / "c.parquet")[1],
    "folder with one bad file": lambda f: _folder(
        f, {"a.txt": b"fine text " * 300, "b.jsonl": b"[]\n"}
    ),
    "folder with a folder named .txt": lambda f: _folder(f, {"a.txt": b"fine " * 300}, "sub.txt"),
    "folder without text files": lambda f: _folder(f, {"a.csv": b"x,y"}),
    "missing path": lambda f: f / "nowhere.txt",
}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder(folder: Path, files: dict[str, bytes], subfolder: str | None = None) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    if subfolder:
        (corpus / subfolder).mkdir()
    return corpus


def broken_model(world: dict, folder: Path, damage: Callable[[Path], None]) -> Path:
    model = Path(shutil.copytree(world["model"], folder / "model"))
    damage(model)
    return model


MODELS: dict[str, Callable[[Path], None]] = {
    "config.json not JSON": lambda m: (m / "config.json").write_text("{"),
    "config.json a list": lambda m: (m / "config.json").write_text("[]"),
    "weights truncated": lambda m: write(
        m / "model.safetensors", (m / "model.safetensors").read_bytes()[:200]
    ),
    "weights deleted": lambda m: (m / "model.safetensors").unlink(),
    "tokenizer deleted": lambda m: [p.unlink() for p in m.glob("tokenizer*")] and None,
}


# ---- per command -------------------------------------------------------------------------------


def collect_args(world: dict, out: Path, dataset: Path | None = None, model=None) -> list[str]:
    return [
        "collect",
        "--model",
        str(model or world["model"]),
        "--dataset",
        str(dataset or world["corpus"]),
        "--out",
        str(out),
        "--window",
        str(WINDOW),
        "--max-tokens",
        str(WINDOW * 6),
        "--keep-keys",
        "all",
        "--shard-windows",
        "2",
        "--device",
        "cpu",
    ]


def no_complete_run(folder: Path, result: Result) -> str | None:
    for manifest in folder.rglob(MANIFEST):
        if json.loads(manifest.read_text()).get("state") == "complete":
            return f"{manifest} says complete"
    return None


def resume_hint_repairs(world: dict, out: Path, result: Result) -> str | None:
    """The hint's command must finish the interrupted run: run it, then verify."""
    if json.loads((out / MANIFEST).read_text())["state"] != "partial":
        return "the stopped run is not marked partial"
    command = shlex.split(result.stderr.split("Hint:", 1)[1].split("`")[1])
    if command[:3] != ["keyspace", "collect", "--resume"]:
        return f"the hint names {command[:3]}"
    resumed = invoke(command[1:])
    return f"its resume exited {resumed.exit_code}" if resumed.exit_code else same_data(world, out)


@contextlib.contextmanager
def ctrl_c_after_first_commit() -> Iterator[bool]:
    import keyspace.collect.runner as stage

    real = stage.commit_chunk

    def commit_then_ctrl_c(*args) -> None:
        real(*args)
        raise KeyboardInterrupt

    stage.commit_chunk = commit_then_ctrl_c
    try:
        yield True
    finally:
        stage.commit_chunk = real


def test_collect(world, tmp_path):
    cases = run_damage_cases(
        "collect",
        world,
        lambda run, folder: [*collect_args(world, run), "--resume"],
        expect="repaired",
        check=lambda folder, result: same_data(world, folder / "run"),
    )
    for case in cases:
        if case.label.endswith("a folder in its place"):  # collect never deletes a user's folder
            case.expect, case.check = "error", lambda folder, result: None
    for label, make in DATASETS.items():
        args = lambda f, m=make: collect_args(world, f / "out", m(f))  # noqa: E731
        cases.append(Case(f"dataset: {label}", args, check=no_complete_run))
    for label, damage in MODELS.items():
        args = lambda f, d=damage: collect_args(world, f / "out", model=broken_model(world, f, d))  # noqa: E731
        cases.append(Case(f"model: {label}", args, check=no_complete_run))
    cases += output_cases(lambda f, out: collect_args(world, out), no_complete_run)
    cases.append(
        Case(
            "output: disk full mid-run (then the hint's resume)",
            lambda f: collect_args(world, f / "out"),
            check=lambda f, r: resume_hint_repairs(world, f / "out", r),
            around=lambda f: full_disk(after=4),  # the manifest and a chunk commit first
        )
    )
    cases.append(
        Case(
            "Ctrl-C mid-run (then the hint's resume)",
            lambda f: collect_args(world, f / "out"),
            expect="interrupted",
            check=lambda f, r: resume_hint_repairs(world, f / "out", r),
            around=lambda f: ctrl_c_after_first_commit(),
        )
    )
    run_cases("collect", cases, tmp_path)


def test_analyze(world, tmp_path):
    cases = run_damage_cases("analyze", world, lambda run, folder: ["analyze", str(run)])
    cases += [
        Case(
            "run folder: read-only",
            lambda f: ["analyze", str(copy_run(world, f))],
            around=lambda f: read_only(f / "run"),
        ),
        Case(
            "run folder: disk full",
            lambda f: ["analyze", str(copy_run(world, f))],
            check=lambda f, r: (
                None
                if not (f / "run" / RANKS).read_bytes() != (world["run"] / RANKS).read_bytes()
                else "it changed the analysis"
            ),
            around=lambda f: full_disk(),
        ),
        Case("run: missing", lambda f: ["analyze", str(f / "nowhere")]),
        Case("run: a file", lambda f: ["analyze", str(write(f / "file", b"x"))]),
        Case("run: a folder that is no run", lambda f: ["analyze", str(f)]),
        Case("--threshold garbage", lambda f: ["analyze", str(copy_run(world, f)), "-t", "0.9,x"]),
    ]
    run_cases("analyze", cases, tmp_path)


def test_rank_report(world, tmp_path):
    cases = run_damage_cases(
        "rank-report", world, lambda run, folder: ["rank-report", str(run), "--json"]
    )
    for case in cases:
        if case.label in (f"{RANKS}: deleted", f"{CALIBRATION}: deleted"):
            case.expect = "repaired"  # it writes the analysis afresh from the verified moments
            case.check = lambda f, r: same_data(world, f / "run")
    no_index = lambda f, r: "it wrote a report" if list(f.rglob("index.html")) else None  # noqa: E731
    report = lambda f, out: ["rank-report", str(copy_run(world, f)), "--out", str(out)]  # noqa: E731
    cases += output_cases(report, no_index)
    cases += [
        Case("run: missing", lambda f: ["rank-report", str(f / "nowhere"), "--json"]),
        Case("run: a file", lambda f: ["rank-report", str(write(f / "file", b"x")), "--json"]),
        Case(
            "runs of two models",
            lambda f: [
                "rank-report",
                str(copy_run(world, f)),
                str(other_model(world, f)),
                "--json",
            ],
        ),
    ]
    run_cases("rank-report", cases, tmp_path)


def other_model(world: dict, folder: Path) -> Path:
    other = Path(shutil.copytree(world["run"], folder / "other"))
    _edit(_set("model", "identity", value="weights:another"))(other / MANIFEST)
    return other


def validate_args(world: dict, run: Path, out: Path, dataset: Path | None = None) -> list[str]:
    return [
        "validate",
        "--run",
        str(run),
        "--dataset",
        str(dataset or world["corpus"]),
        "--window",
        str(WINDOW),
        "--max-tokens",
        str(2 * WINDOW),
        "--d",
        "4",
        "--k",
        "0.5",
        "--methods",
        "loki",
        "--recall-windows",
        "0",
        "--decode-prompts",
        "0",
        "--out",
        str(out),
    ]


def no_results(folder: Path, result: Result) -> str | None:
    return "it wrote validate.json" if list(folder.rglob("validate.json")) else None


def test_validate(world, tmp_path):
    cases = run_damage_cases(
        "validate",
        world,
        lambda run, folder: validate_args(world, run, folder / "out"),
        check=no_results,
    )
    for label, make in DATASETS.items():
        args = lambda f, m=make: validate_args(world, copy_run(world, f), f / "out", m(f))  # noqa: E731
        cases.append(Case(f"dataset: {label}", args, check=no_results))
    cases += output_cases(lambda f, out: validate_args(world, copy_run(world, f), out), no_results)
    cases.append(
        Case(
            "output: disk full",
            lambda f: validate_args(world, copy_run(world, f), f / "out"),
            check=no_results,
            around=lambda f: full_disk(),
        )
    )
    run_cases("validate", cases, tmp_path)


def test_verify(world, tmp_path):
    cases = run_damage_cases("verify", world, lambda run, folder: ["verify", str(run)])
    cases += [
        Case("run: missing", lambda f: ["verify", str(f / "nowhere")]),
        Case("run: a file", lambda f: ["verify", str(write(f / "file", b"x"))]),
    ]
    run_cases("verify", cases, tmp_path)


def test_bench(world, tmp_path):
    def bench(folder: Path, out: Path) -> list[str]:
        return ["bench", "--model", str(world["model"]), "--seq", "64", "--out", str(out)]

    cases = output_cases(bench)
    for label, damage in MODELS.items():
        if label.startswith("config"):
            args = lambda f, d=damage: ["bench", "--model", str(broken_model(world, f, d))]  # noqa: E731
            cases.append(Case(f"model: {label}", args))
    cases += [
        Case(
            "--kv-heads not dividing --heads",
            lambda f: ["bench", "--heads", "32", "--kv-heads", "5"],
        ),
        Case("--d without --k", lambda f: ["bench", "--d", "32"]),
        Case("--dtype unknown", lambda f: ["bench", "--dtype", "float8"]),
    ]
    run_cases("bench", cases, tmp_path)


# ---- smaller defects: the repair is listed; a disk that fills mid-report names the file ------


def test_resume_lists_a_rebuilt_manifest_as_repaired(world, tmp_path):
    run = copy_run(world, tmp_path)
    TEXT_DAMAGE["not JSON"](run / MANIFEST)
    result = invoke([*collect_args(world, run), "--resume"])
    assert result.exit_code == 0, result.output
    repaired = [line for line in result.stderr.splitlines() if line.startswith("Repaired: ")]
    assert any(MANIFEST in line and "rebuilt" in line for line in repaired), result.stderr
    assert same_data(world, run) is None


@pytest.mark.parametrize("command", ["validate", "rank-report"])
def test_a_disk_that_fills_mid_report_names_the_file_and_leaves_nothing_partial(
    world, tmp_path, command
):
    run, out = copy_run(world, tmp_path), tmp_path / "out"
    args = validate_args(world, run, out) if command == "validate" else None
    args = args or ["rank-report", str(run), "--out", str(out)]
    with full_disk(after=1):  # validate.json (or the first PNG) is written; the next file fails
        result = invoke(args)
    assert classify(result) == "error", result.output
    failed = Path(result.stderr.split("cannot write ", 1)[1].split(": no space")[0])
    assert failed.parent == out and not failed.exists(), result.stderr
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp left
