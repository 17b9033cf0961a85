"""Resealed runs: a field edited, then every checksum recomputed, as anyone can do.

`content_sha256` and the recorded sha256s detect damage, not tampering. After the hash check,
every file is parsed and checked, so an edited-and-resealed run still ends in exactly one
`Error: ... Hint: ...` line and exit 2 from every command that reads the edited file: never a
traceback, never a silent acceptance. Also here: analyze as one commit (Ctrl-C at each step
leaves a consistent analysis), its lock, and deterministic calibration bytes.

`pytest tests/test_faults_resealed.py -s` prints the table per command.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save
from tiny_models import save_tiny_model, write_corpus
from typer.testing import CliRunner

from keyspace.analyze.pca import AnalyzeConfig, analyze_and_write
from keyspace.cli.main import app
from keyspace.collect.runner import CollectConfig, collect
from keyspace.errors import KeyspaceError
from keyspace.runfolder import analysis as analysis_files
from keyspace.runfolder.analysis import read_calibration, read_ranks
from keyspace.runfolder.files import sealed
from keyspace.runfolder.lock import FolderLock
from keyspace.runfolder.verify import verify_run

WINDOW = 32
MANIFEST, MOMENTS = "manifest.json", "moments.safetensors"
RANKS, CALIBRATION = "ranks.json", "calibration.safetensors"
PROGRESS = "progress/rank0.json"
SHARD = "keys/post/layer01/r0-00001.safetensors"
# The run files each command reads after their hash: an edit to one must be refused.
READS = {
    "analyze": (MANIFEST, MOMENTS),
    "rank-report": (MANIFEST, MOMENTS, SHARD, RANKS, CALIBRATION),
    "validate": (MANIFEST, RANKS, CALIBRATION),
    "verify": (MANIFEST, MOMENTS, SHARD, PROGRESS, RANKS, CALIBRATION),
}
TABLE: dict[str, Counter] = {}


# ---- edits ------------------------------------------------------------------------------------


def _json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))  # NaN is written as bare NaN, which json.loads reads

    return apply


def _set(*keys: object, value: object) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        for key in keys[:-1]:
            doc = doc[key]
        doc[keys[-1]] = value

    return edit


def _tensor(name: str, index: tuple, value: float) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = path.read_bytes()
        tensors = load(data)
        tensors[name][index] = value
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__")
        path.write_bytes(save(tensors, metadata=metadata))

    return apply


EDITS: dict[str, dict[str, Callable[[Path], None]]] = {
    MANIFEST: {
        "dataset a string": _json(_set("dataset", value="wikitext")),
        "num_layers a string": _json(_set("num_layers", value="2")),
        "head_dim absurd": _json(_set("head_dim", value=10**12)),
        "tokens negative": _json(_set("tokens", value=-5)),
        "world_size 1e9": _json(_set("world_size", value=10**9)),
        "world_size 1e9 as a float": _json(_set("world_size", value=1e9)),
        "world_size above its windows": _json(_set("world_size", value=7)),
        "model.spec a number": _json(_set("model", "spec", value=5)),
        "capture a string": _json(_set("capture", value="keys")),
        "keep_keys a number": _json(_set("keep_keys", value=5)),
        "num_windows a string": _json(_set("num_windows", value="6")),
        "shards ragged (an entry a list)": _json(_set("shards", 0, value=[1, 2])),
        "shard tokens negative": _json(_set("shards", 0, "tokens", value=-1)),
        "shard layer a bool": _json(_set("shards", 0, "layer", value=True)),
    },
    PROGRESS: {
        "chunks_done negative": _json(_set("chunks_done", value=-1)),
        "shard kind removed": _json(lambda d: d["shards"][0].pop("kind")),
        "shard layer a string": _json(_set("shards", 0, "layer", value="1")),
    },
    RANKS: {
        "post a number": _json(_set("post", value=5)),
        "a rank above head_dim": _json(lambda d: d["post"]["rank_at"]["0.9"][0].__setitem__(0, 99)),
        "rank table ragged": _json(lambda d: d["pre"]["rank_at"]["0.9"].__setitem__(0, [1])),
        "a rank a string": _json(lambda d: d["pre"]["rank_at"]["0.9"][1].__setitem__(0, "3")),
        "a ratio NaN": _json(
            lambda d: d["post"]["explained_variance_ratio"][0][0].__setitem__(0, float("nan"))
        ),
        "a ratio above 1": _json(
            lambda d: d["pre"]["explained_variance_ratio"][1][1].__setitem__(2, 2.0)
        ),
        "ratio vector short": _json(lambda d: d["pre"]["explained_variance_ratio"][0][0].pop()),
        "head_dim a string": _json(_set("head_dim", value="16")),
        "queries a string": _json(_set("queries", value="yes")),
        "calibration_sha256 a number": _json(_set("calibration_sha256", value=5)),
        "threshold not a number": _json(
            lambda d: d["post"]["rank_at"].__setitem__("x", d["post"]["rank_at"]["0.9"])
        ),
    },
    MOMENTS: {
        "NaN in post.sum": _tensor("post.sum", (1, 0, 3), float("nan")),
        "Inf in pre.outer": _tensor("pre.outer", (0, 1, 2, 2), float("inf")),
        "NaN in a count": _tensor("pre.count", (1,), float("nan")),
    },
    CALIBRATION: {
        "NaN in post.components": _tensor("post.components", (1, 0, 2, 3), float("nan")),
        "Inf in pre.mean": _tensor("pre.mean", (0, 1, 0), float("inf")),
    },
    SHARD: {
        "NaN in kept keys": _tensor("keys", (3, 1, 5), float("nan")),
    },
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reseal(run: Path) -> None:
    """Recompute every recorded sha256 and content checksum, as a hostile editor would: the
    shards and moments in the manifest and progress files, the calibration and the moments in
    ranks.json, then each JSON document's own checksum."""
    progress_path = run / PROGRESS
    progress = json.loads(progress_path.read_text())
    for shard in progress.get("shards") or []:
        if isinstance(shard, dict) and (run / str(shard.get("path"))).is_file():
            shard["sha256"] = _sha(run / shard["path"])
    progress_path.write_text(json.dumps(sealed(progress), indent=2))
    manifest = json.loads((run / MANIFEST).read_text())
    for shard in manifest.get("shards") if isinstance(manifest.get("shards"), list) else []:
        if isinstance(shard, dict) and isinstance(shard.get("path"), str):
            shard["sha256"] = _sha(run / shard["path"])
    manifest["moments"]["sha256"] = _sha(run / MOMENTS)
    (run / MANIFEST).write_text(json.dumps(sealed(manifest), indent=2))
    ranks = json.loads((run / RANKS).read_text())
    if not isinstance(ranks.get("calibration_sha256"), int):
        ranks["calibration_sha256"] = _sha(run / CALIBRATION)
    ranks["moments_sha256"] = manifest["moments"]["sha256"]
    (run / RANKS).write_text(json.dumps(sealed(ranks), indent=2))


# ---- the run and the commands ----------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resealed")
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


def args_of(command: str, run: Path, world: dict, out: Path) -> list[str]:
    if command == "analyze":
        return ["analyze", str(run), "--json"]
    if command == "rank-report":
        return ["rank-report", str(run), "--json"]
    if command == "verify":
        return ["verify", str(run)]
    return [
        *("validate", "--run", str(run), "--dataset", str(world["corpus"])),
        *("--window", str(WINDOW), "--max-tokens", str(2 * WINDOW), "--d", "auto:0.9"),
        *("--k", "0.5", "--methods", "loki", "--recall-windows", "0", "--decode-prompts", "0"),
        *("--out", str(out)),
    ]


def outcome(result) -> str:
    """error (exit 2, one `Error:` line with a hint), traceback, accepted (exit 0), or other."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"traceback ({type(result.exception).__name__}: {result.exception})"
    if "Traceback" in result.output:
        return "traceback"
    if result.exit_code == 0:
        return "accepted"
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    if result.exit_code == 2 and len(lines) == 1 and " Hint: " in lines[0]:
        return "error"
    return f"exit {result.exit_code}, {len(lines)} Error lines"


def cases_for(command: str) -> list[tuple[str, str, Callable[[Path], None]]]:
    return [
        (name, label, edit)
        for name, edits in EDITS.items()
        if name in READS[command]
        for label, edit in edits.items()
    ]


@pytest.mark.parametrize("command", sorted(READS))
def test_resealed_edit_is_one_error(command, world, tmp_path):
    counts, wrong = Counter(), []
    for i, (name, label, edit) in enumerate(cases_for(command)):
        run = Path(shutil.copytree(world["run"], tmp_path / f"case{i}"))
        edit(run / name)
        reseal(run)
        result = CliRunner().invoke(app, args_of(command, run, world, tmp_path / f"out{i}"))
        got = outcome(result)
        counts["cases"] += 1
        counts[got.split(" ")[0]] += 1
        message = result.stderr.strip()
        if got != "error":
            wrong.append(f"{name}: {label}: {got}\n{result.output[-600:]}")
        elif name.split("/")[-1] not in message and command != "verify":
            wrong.append(f"{name}: {label}: the error does not name the file: {message}")
    TABLE[command] = counts
    print(f"\n{command}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    assert counts["cases"] >= 10
    assert not wrong, "\n".join(wrong)


def test_resealed_pristine_run_passes(world, tmp_path):
    """The control: resealing an unedited run changes nothing, and every command accepts it."""
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    reseal(run)
    assert not verify_run(run).bad
    assert outcome(CliRunner().invoke(app, ["verify", str(run)])) == "accepted"


def test_verify_refuses_another_runs_analysis(world, tmp_path):
    """ranks.json + calibration from a run of other moments: intact files, the wrong pair."""
    other_corpus = write_corpus(tmp_path / "other.txt", repeats=3)
    other = collect(
        CollectConfig(
            out=tmp_path / "other",
            model=str(world["model"]),
            dataset=str(other_corpus),
            window=WINDOW,
            max_tokens=WINDOW * 4,
            keep_keys="none",
            device="cpu",
        )
    ).out
    analyze_and_write(other)
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    for name in (RANKS, CALIBRATION):
        shutil.copy(other / name, run / name)
    bad = {f.path: f.state for f in verify_run(run).bad}
    assert bad == {RANKS: "stale"}
    result = CliRunner().invoke(app, ["verify", str(run)])
    assert outcome(result) == "error"
    assert f"keyspace analyze {run}" in result.stderr and "stale" in result.stderr


def test_json_output_never_prints_nan(capsys):
    from keyspace.cli.common import print_json

    with pytest.raises(KeyspaceError, match=r"NaN or Inf at \$\.post\[1\]\.mean"):
        print_json({"post": [{"mean": 1.0}, {"mean": float("nan")}]})
    assert capsys.readouterr().out == ""
    print_json({"ok": [0.5, None]})
    assert json.loads(capsys.readouterr().out) == {"ok": [0.5, None]}


# ---- the analysis as one commit -------------------------------------------------------------


def _pair_is_consistent(run: Path) -> str | None:
    """None when ranks.json and the calibration it records are one analysis of the run's moments."""
    ranks = read_ranks(run)
    calibration = read_calibration(run, ranks)  # verified against ranks' record
    if calibration.metadata["centered"] != ("true" if ranks["centered"] else "false"):
        return "the calibration and ranks.json come from different analyses"
    bad = verify_run(run).bad
    return f"verify fails: {[(f.path, f.state) for f in bad]}" if bad else None


class FileOps:
    """Wraps os.replace and Path.unlink: records each call, and raises KeyboardInterrupt at call
    number `stop_at` (0-based) instead of making it: Ctrl-C between any two file operations."""

    def __init__(self, monkeypatch, stop_at: int | None = None):
        self.calls: list[tuple[str, str]] = []
        self.stop_at = stop_at
        replace, unlink = os.replace, Path.unlink

        def on_replace(src, dst, *args, **kwargs):
            self.tick("replace", Path(dst).name)
            return replace(src, dst, *args, **kwargs)

        def on_unlink(path, *args, **kwargs):
            self.tick("unlink", Path(path).name)
            return unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "replace", on_replace)
        monkeypatch.setattr(Path, "unlink", on_unlink)

    def tick(self, op: str, name: str) -> None:
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append((op, name))


def reanalysis_ops(world: dict, tmp_path: Path, monkeypatch) -> list[tuple[str, str]]:
    """The file operations of a re-analysis (centered -> uncentered), in order."""
    run = Path(shutil.copytree(world["run"], tmp_path / "probe"))
    (run / "calibration.0123456789abcdef.safetensors").write_bytes(b"stray")
    ops = FileOps(monkeypatch)
    analyze_and_write(run, AnalyzeConfig(centered=False))
    monkeypatch.undo()
    return ops.calls


def test_ctrl_c_at_each_file_operation_leaves_one_analysis(world, tmp_path, monkeypatch):
    """Ctrl-C before each rename or removal a re-analysis makes (centered -> uncentered): the old
    analysis or the new one, verified, never a mismatched or missing pair; the next analyze
    completes it and leaves no stray file."""
    ops = reanalysis_ops(world, tmp_path, monkeypatch)
    commit = ops.index(("replace", RANKS))
    assert commit > 0 and ("replace", CALIBRATION) in ops[commit:]  # the calibration moves last
    for stop_at in range(len(ops)):
        run = Path(shutil.copytree(world["run"], tmp_path / f"run{stop_at}"))
        (run / "calibration.0123456789abcdef.safetensors").write_bytes(b"stray")
        FileOps(monkeypatch, stop_at)
        with pytest.raises(KeyboardInterrupt):
            analyze_and_write(run, AnalyzeConfig(centered=False))
        monkeypatch.undo()
        assert _pair_is_consistent(run) is None, f"Ctrl-C before {ops[stop_at]}"
        assert read_ranks(run)["centered"] is (stop_at <= commit), f"Ctrl-C before {ops[stop_at]}"
        analyze_and_write(run, AnalyzeConfig(centered=False))
        assert _pair_is_consistent(run) is None and read_ranks(run)["centered"] is False
        assert sorted(p.name for p in run.glob("calibration*")) == [CALIBRATION]


def test_interrupted_writers_leave_the_old_analysis(world, tmp_path, monkeypatch):
    """Ctrl-C inside the writers themselves (the staged calibration, ranks.json)."""

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    for writer in ("write_bytes_atomic", "write_json_atomic"):
        run = Path(shutil.copytree(world["run"], tmp_path / writer))
        monkeypatch.setattr(analysis_files, writer, stop)
        with pytest.raises(KeyboardInterrupt):
            analyze_and_write(run, AnalyzeConfig(centered=False))
        monkeypatch.undo()
        assert _pair_is_consistent(run) is None and read_ranks(run)["centered"] is True


def test_second_analyze_is_refused_while_the_folder_is_locked(world, tmp_path):
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    before = (run / RANKS).read_bytes()
    with FolderLock(run, 0), pytest.raises(KeyspaceError, match="another keyspace process") as err:
        analyze_and_write(run)
    assert "keyspace analyze" in err.value.hint
    assert (run / RANKS).read_bytes() == before


def test_same_moments_give_the_same_calibration_bytes(world, tmp_path):
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    first = (run / CALIBRATION).read_bytes()
    (run / CALIBRATION).unlink()
    (run / RANKS).unlink()
    analyze_and_write(run)
    assert (run / CALIBRATION).read_bytes() == first
    # the canonical header still parses to the same tensors as safetensors wrote them
    calibration = read_calibration(run)
    tensors = load(first)
    assert set(tensors) == {
        f"{kind}.{part}"
        for kind in calibration.components
        for part in ("mean", "components", "eigenvalues")
    } | {name for name in tensors if "score" in name}
    torch.testing.assert_close(tensors["post.components"], calibration.components["post"])


def test_the_table():
    """`pytest tests/test_faults_resealed.py -s` prints it; no traceback, no silent acceptance."""
    for command, counts in sorted(TABLE.items()):
        print(f"{command:12} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        assert counts["traceback"] == 0 and counts["accepted"] == 0


def test_validate_json_is_checked_before_it_is_rendered_again(tmp_path):
    from keyspace.validate.results import ResultRow, ValidateResult, read_validate_json

    row = ResultRow("loki", 4, 4.0, 0.5, "fraction", 12.5, 2.5, 64, 62, 0.75, 0.1, "key")
    doc = ValidateResult({"model": {"spec": "m"}}, [row], recall=[{"rho": None}]).to_json()
    path = tmp_path / "validate.json"
    path.write_text(json.dumps(doc))
    assert read_validate_json(path, "hint") == doc
    edits = {
        "results[0].ppl": lambda d: d["results"][0].__setitem__("ppl", float("nan")),
        "results[0].tokens": lambda d: d["results"][0].__setitem__("tokens", "64"),
        "recall is not a list": lambda d: d.__setitem__("recall", 5),
        "speed is not an object": lambda d: d.__setitem__("speed", []),
        "decode[0].seconds": lambda d: d.__setitem__("decode", [{"seconds": float("inf")}]),
    }
    for field_name, edit in edits.items():
        bad = json.loads(json.dumps(doc))
        edit(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(KeyspaceError, match=re.escape(field_name)) as err:
            read_validate_json(path, "Run `keyspace validate` again.")
        assert str(path) in err.value.message and err.value.hint


def test_validate_json_takes_null_for_a_diverged_row_and_refuses_other_types(tmp_path):
    """ppl, nll and kv_bytes_fraction may be null (a NaN or infinity, as keyspace writes it);
    a string, a boolean, a list or a missing field is still refused."""
    from keyspace.validate.results import ResultRow, ValidateResult, read_validate_json

    row = ResultRow("loki", 4, 4.0, 0.5, "fraction", 12.5, 2.5, 64, 62, 0.75, 0.1, "key")
    doc = ValidateResult({"model": {"spec": "m"}}, [row]).to_json()
    path = tmp_path / "validate.json"
    for name in ("ppl", "nll", "kv_bytes_fraction"):
        for bad in ("12.5", True, [1.0], "missing"):
            edited = json.loads(json.dumps(doc))
            if bad == "missing":
                del edited["results"][0][name]
            else:
                edited["results"][0][name] = bad
            path.write_text(json.dumps(edited))
            with pytest.raises(KeyspaceError, match=re.escape(f"results[0].{name}")):
                read_validate_json(path, "Run `keyspace validate` again.")
        edited = json.loads(json.dumps(doc))
        edited["results"][0][name] = None
        path.write_text(json.dumps(edited))
        assert read_validate_json(path, "hint") == edited


@pytest.mark.parametrize("name", [MOMENTS, SHARD])
def test_resume_repairs_a_resealed_nan(name, world, tmp_path):
    """`collect --resume`, the command verify's hint names, recomputes a file holding a NaN under
    a resealed hash: afterwards verify passes and the file is the original again."""
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    edit = EDITS[name]["NaN in post.sum" if name == MOMENTS else "NaN in kept keys"]
    edit(run / name)
    reseal(run)
    assert [f.path for f in verify_run(run).bad] == [name]
    cfg = CollectConfig(
        out=run,
        model=str(world["model"]),
        dataset=str(world["corpus"]),
        window=WINDOW,
        max_tokens=WINDOW * 6,
        keep_keys="all",
        shard_windows=2,
        device="cpu",
        resume=True,
    )
    result = collect(cfg)
    assert result.repairs and all("damaged" in repair for repair in result.repairs)
    assert (run / name).read_bytes() == (world["run"] / name).read_bytes()
    assert [f.path for f in verify_run(run).bad] in ([], [RANKS])  # ranks: stale only if resealed


def test_manifest_reads_and_writes_back_byte_identical(world, tmp_path):
    """Old run folders keep opening: the typed Manifest gives back the document it read, key
    order and uninterpreted fields included, so rewriting a manifest changes no byte."""
    from dataclasses import replace

    from keyspace.runfolder.manifest import Manifest
    from keyspace.runfolder.store import RunFolder, write_manifest

    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    original = (run / MANIFEST).read_bytes()
    manifest = RunFolder.open(run).manifest
    doc = json.loads(original)
    assert manifest.to_json() == {k: v for k, v in doc.items() if k != "content_sha256"}
    assert list(manifest.to_json()) == [k for k in doc if k != "content_sha256"]
    write_manifest(run, manifest)
    assert (run / MANIFEST).read_bytes() == original
    assert Manifest.from_json(manifest.to_json(), run / MANIFEST) == manifest
    edited = replace(manifest, dataset_split="valid")
    assert edited.to_json()["dataset"]["split"] == "valid"
    assert edited.to_json()["dataset"]["corpus_sha256"] == doc["dataset"]["corpus_sha256"]
