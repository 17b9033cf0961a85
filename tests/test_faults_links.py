"""Fault injection, the symlink family: a link planted at any path keyspace writes is never
followed out of the folder.

A received run (or a prepared report folder) may carry a symbolic link at the name of a file
keyspace writes, or in place of a folder it writes into, pointing at a file of the user's outside
it. Each case plants one, runs the command, and expects the file outside untouched and either one
`Error: ... Hint: ...` line (exit 2) naming the link, or a clean run that replaced nothing
through it. Special files (a FIFO, a device, a folder) where a file is read are refused before a
byte is read, and never hang.
"""

# ruff: noqa: F811  (the fixtures `world` and `one_thread` come from test_faults)
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_faults import (  # noqa: F401
    RANKS,
    classify,
    collect_args,
    copy_run,
    invoke,
    one_thread,
    validate_args,
    world,
)

SECRET = b"the user's file outside the run: keyspace must never write here\n"


def outside(folder: Path) -> Path:
    target = folder / "outside" / "precious.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(SECRET)
    return target


def plant(link: Path, target: Path) -> None:
    """A symbolic link at `link` (replacing a file or folder there) pointing at `target`."""
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif os.path.lexists(link):
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


class Hang(BaseException):
    pass


@contextlib.contextmanager
def no_hang(seconds: int = 60) -> Iterator[None]:
    """Fail (instead of hanging the suite) when a command blocks on a FIFO or reads forever."""

    def stop(signum, frame):  # not an OSError (TimeoutError is one): no handler may swallow it
        raise Hang(f"the command ran past {seconds} s: it hangs on a special file")

    before = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def expect_safe(result, target: Path, link: Path, clean_ok: bool = False) -> None:
    """The file outside is untouched; the command ended in one Error line naming the link (or,
    where `clean_ok`, in a clean exit that replaced nothing through it)."""
    assert target.read_bytes() == SECRET, f"a write went through the link at {link}"
    outcome = classify(result)
    if clean_ok and outcome == "accepted":
        return
    assert outcome == "error", f"{outcome}\n{result.output[-1500:]}"
    assert str(link.parent) in result.stderr or link.name in result.stderr, result.stderr


# ---- collect -----------------------------------------------------------------------------------

# Every path collect writes in a run folder (files, and folders it writes into).
COLLECT_PATHS = (
    ".lock-rank0",
    "manifest.json",
    "moments.safetensors",
    "progress",
    "progress/rank0.json",
    "progress/moments.rank0.c00003.safetensors",
    "keys",
    "keys/post",
    "keys/post/layer01",
    "keys/post/layer01/r0-00001.safetensors",
)


@pytest.mark.parametrize("name", COLLECT_PATHS)
def test_collect_resume_never_writes_through_a_link(world, tmp_path, name):
    run, target = copy_run(world, tmp_path), outside(tmp_path)
    plant(run / name, target if "." in Path(name).name else target.parent)
    result = invoke([*collect_args(world, run), "--resume"])
    expect_safe(result, target, run / name)


def test_new_collect_into_a_prepared_folder_with_a_lock_link(world, tmp_path):
    out, target = tmp_path / "out", outside(tmp_path)
    plant(out / ".lock-rank0", target)
    result = invoke(collect_args(world, out))
    expect_safe(result, target, out / ".lock-rank0")
    assert "symbolic link" in result.stderr


def test_a_lock_that_is_a_folder_is_an_error_with_a_hint_that_fixes_it(world, tmp_path):
    out = tmp_path / "out"
    (out / ".lock-rank0").mkdir(parents=True)
    result = invoke(collect_args(world, out))
    assert classify(result) == "error" and "is a folder" in result.stderr, result.output
    assert "rm -r" in result.stderr
    shutil.rmtree(out / ".lock-rank0")  # what the hint says
    assert invoke(collect_args(world, out)).exit_code == 0


# ---- analyze -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", (RANKS, "calibration.safetensors", ".lock-rank0"))
def test_analyze_never_writes_through_a_link(world, tmp_path, name):
    run, target = copy_run(world, tmp_path), outside(tmp_path)
    plant(run / name, target)
    result = invoke(["analyze", str(run)])
    expect_safe(result, target, run / name)


# ---- validate ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validate_names(world, tmp_path_factory) -> list[str]:
    """The files a clean validate writes into its output folder."""
    out = tmp_path_factory.mktemp("validate") / "out"
    result = invoke(validate_args(world, world["run"], out))
    assert result.exit_code == 0, result.output
    return sorted(p.name for p in out.iterdir())


def test_validate_never_writes_through_a_link(world, tmp_path, validate_names):
    assert {"validate.json", "validate.html"} <= set(validate_names)
    for i, name in enumerate(validate_names):
        folder = tmp_path / f"case{i}"
        run, target = copy_run(world, folder), outside(folder)
        out = folder / "out"
        plant(out / name, target)
        expect_safe(invoke(validate_args(world, run, out)), target, out / name)


def test_validate_default_folder_a_link_is_refused(world, tmp_path):
    run, target = copy_run(world, tmp_path), outside(tmp_path)
    plant(run / "validate", target.parent)
    args = validate_args(world, run, run)
    result = invoke(args[: args.index("--out")])  # no --out: <run>/validate
    expect_safe(result, target, run / "validate")
    assert sorted(p.name for p in target.parent.iterdir()) == ["precious.txt"]


# ---- rank-report and the cross-links -----------------------------------------------------------


@pytest.fixture(scope="module")
def report_names(world, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("report") / "out"
    result = invoke(["rank-report", str(world["run"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return sorted(p.name for p in out.iterdir())


def test_rank_report_never_writes_through_a_link(world, tmp_path, report_names):
    assert "index.html" in report_names
    for i, name in enumerate(report_names[:3] + ["index.html"]):
        folder = tmp_path / f"case{i}"
        run, target = copy_run(world, folder), outside(folder)
        out = folder / "out"
        plant(out / name, target)
        result = invoke(["rank-report", str(run), "--out", str(out)])
        expect_safe(result, target, out / name)


def test_cross_linking_writes_no_predictable_temp_and_follows_no_linked_folder(
    world, tmp_path, report_names
):
    """A validate page beside a rank report gets relinked: through no planted `.tmp` name, and
    not at all when its folder is a link out of the report folder."""
    run = copy_run(world, tmp_path)
    out, target = tmp_path / "out", outside(tmp_path)
    assert invoke(validate_args(world, run, out / "validate")).exit_code == 0
    plant(out / "validate" / ".validate.html.tmp", target)
    result = invoke(["rank-report", str(run), "--out", str(out)])
    assert result.exit_code == 0 and target.read_bytes() == SECRET, result.output
    assert "../index.html" in (out / "validate" / "validate.html").read_text()

    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "validate", elsewhere)
    before = (elsewhere / "validate.html").read_bytes()
    plant(out / "validate", elsewhere)
    result = invoke(["rank-report", str(run), "--out", str(out)])
    assert result.exit_code == 0 and (elsewhere / "validate.html").read_bytes() == before


# ---- special files where a file is read ------------------------------------------------------


def fifo(path: Path) -> None:
    if os.path.lexists(path):
        path.unlink()
    os.mkfifo(path)


SPECIAL: dict[str, Callable[[Path], None]] = {
    "a FIFO": fifo,
    "a link to /dev/zero": lambda p: plant(p, Path("/dev/zero")),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("name", ("moments.safetensors", "manifest.json"))
def test_special_run_files_are_refused_without_hanging(world, tmp_path, kind, name):
    for command in (["analyze"], ["verify"]):
        run = copy_run(world, tmp_path / command[0])
        SPECIAL[kind](run / name)
        with no_hang():
            result = invoke([*command, str(run)])
        assert classify(result) == "error", f"{command}: {result.output[-800:]}"
        assert name in result.stderr


@pytest.mark.parametrize("kind", ("a FIFO", "a link to /dev/zero"))
def test_special_corpus_files_are_refused_without_hanging(world, tmp_path, kind):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("fine text " * 300)
    SPECIAL[kind](corpus / "b.txt")
    with no_hang():
        result = invoke(collect_args(world, tmp_path / "out", corpus))
    assert classify(result) == "error", result.output
    assert "b.txt" in result.stderr and "regular file" in result.stderr


# ---- markup in the terminal ----------------------------------------------------------------------


def test_a_run_named_like_markup_prints_through_every_command(world, tmp_path):
    """rich would read `[/x]` as a closing tag and crash after the work was done."""
    run = Path(shutil.copytree(world["run"], tmp_path / "a[/x]b :x:"))
    for args in (
        ["analyze", str(run)],
        ["rank-report", str(run), "--out", str(tmp_path / "r[/y]")],
        validate_args(world, run, tmp_path / "v[/z]"),
        [*collect_args(world, run), "--resume"],
        ["verify", str(run)],
    ):
        result = invoke(args)
        assert result.exit_code == 0, f"{args[0]}: {result.output[-1500:]}"
        assert "[/" in result.stdout, f"{args[0]} printed no path: {result.stdout}"
