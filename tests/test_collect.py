"""collect: run folder contents, exact moments, resume, locking, bad input, crash safety."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import cut_after_one_chunk, save_tiny_model, write_corpus
from typer.testing import CliRunner

from keyspace.cli.main import app
from keyspace.collect.runner import CollectConfig, collect
from keyspace.errors import KeyspaceError
from keyspace.runfolder.store import RunFolder

WINDOW = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


def _cfg(model_dir, corpus, out, **kw):
    args = dict(
        model=str(model_dir),
        dataset=str(corpus),
        out=out,
        window=WINDOW,
        max_tokens=WINDOW * 10,
        keep_keys="all",
        shard_windows=3,
    )
    return CollectConfig(**{**args, **kw})


def _moments_tensors(run: Path) -> dict:
    return load_file(str(run / "moments.safetensors"))


def test_run_folder_and_exact_moments(model_dir, corpus, tmp_path):
    result = collect(_cfg(model_dir, corpus, tmp_path / "run"))
    run = RunFolder.open(result.out).require_complete()
    m = run.manifest
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.tokens) == (
        2,
        2,
        16,
        10 * WINDOW,
    )
    model = m.to_json()["model"]  # what keyspace records but does not interpret
    assert model["source"] == "folder" and model["architecture"] == "llama"
    for kind in ("pre", "post"):
        moments = run.moments(kind)
        for layer in range(2):
            keys, positions, windows = run.kept_keys(kind, layer)
            assert keys.shape == (10 * WINDOW, 2, 16)
            assert sorted(zip(windows.tolist(), positions.tolist(), strict=True)) == [
                (w, p) for w in range(10) for p in range(WINDOW)
            ]
            x = keys.double()
            torch.testing.assert_close(
                moments.count[layer], torch.tensor(10.0 * WINDOW, dtype=torch.float64)
            )
            torch.testing.assert_close(moments.sum[layer], x.sum(0), rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(
                moments.outer[layer], torch.einsum("thi,thj->hij", x, x), rtol=1e-12, atol=1e-9
            )
    from keyspace.runfolder.store import sha256_file

    for shard in m.shards:
        assert sha256_file(result.out / shard.path) == shard.sha256


def _queries_by_hand(model_dir, corpus, windows: int, monkeypatch) -> dict[str, torch.Tensor]:
    """Pre- and post-RoPE queries (windows, T, heads, D) of every layer, without keyspace.collect.capture:
    q_proj's output, and the query SDPA receives."""
    from keyspace.collect.corpora import tokenize_windows
    from keyspace.models.loading import load_model

    loaded = load_model(str(model_dir))
    ids = tokenize_windows(str(corpus), loaded.tokenizer, WINDOW, WINDOW * windows).windows
    model, config = loaded.model, loaded.model.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    got: dict[str, list] = {"pre": [], "post": []}
    for layer in model.model.layers:
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: got["pre"].append(o))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        got["post"].append(query.transpose(1, 2))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        for w in range(windows):
            model(ids[w : w + 1])
    layers = config.num_hidden_layers
    shaped = {
        "pre": [o.reshape(1, WINDOW, heads, head_dim) for o in got["pre"]],
        "post": got["post"],
    }
    # per kind: (layers, windows, T, heads, D); calls come window by window, layer by layer
    return {
        kind: torch.stack([torch.cat(parts[layer::layers]) for layer in range(layers)]).double()
        for kind, parts in shaped.items()
    }


def test_query_moments_pool_each_group(model_dir, corpus, tmp_path, monkeypatch):
    """query.{kind} moments per KV head j = sums over the tokens of query heads jG .. jG+G-1."""
    run = RunFolder.open(collect(_cfg(model_dir, corpus, tmp_path / "run")).out)
    assert run.manifest.capture == ("keys", "queries")
    queries = _queries_by_hand(model_dir, corpus, 10, monkeypatch)
    heads, kv_heads = run.manifest.num_heads, run.manifest.num_kv_heads
    group = heads // kv_heads
    assert group == 2  # the tiny Llama is GQA
    for kind in ("pre", "post"):
        moments = run.query_moments(kind)
        for layer in range(2):
            q = queries[kind][layer].reshape(-1, heads, 16)  # (tokens, heads, D)
            assert float(moments.count[layer]) == 10 * WINDOW * group
            for j in range(kv_heads):
                x = q[:, j * group : (j + 1) * group].reshape(-1, 16)
                torch.testing.assert_close(moments.sum[layer, j], x.sum(0), rtol=1e-9, atol=1e-7)
                torch.testing.assert_close(moments.outer[layer, j], x.T @ x, rtol=1e-9, atol=1e-6)
    tensors = _moments_tensors(run.path)
    assert {"query.post.outer", "query.pre.count", "post.outer"} <= set(tensors)


def test_capture_keys_only_gives_todays_run(model_dir, corpus, tmp_path):
    result = collect(_cfg(model_dir, corpus, tmp_path / "keys", capture="keys"))
    run = RunFolder.open(result.out)
    assert run.manifest.capture == ("keys",)
    assert not [name for name in _moments_tensors(run.path) if name.startswith("query.")]
    assert run.query_moments("post") is None and run.moments("post").count[0] == 10 * WINDOW
    assert "--capture keys" in run.resume_command
    with pytest.raises(KeyspaceError, match="captured keys, not keys,queries") as err:
        collect(_cfg(model_dir, corpus, tmp_path / "keys", resume=True, capture="keys,queries"))
    assert "--capture keys" in err.value.hint
    # Without --capture, a resumed run records what it recorded before: an older run stays keys.
    again = collect(_cfg(model_dir, corpus, tmp_path / "keys", resume=True))
    assert again.state == "complete" and RunFolder.open(again.out).manifest.capture == ("keys",)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("keys", ("keys",)),
        ("queries,keys", ("keys", "queries")),
        ("keys, queries", ("keys", "queries")),
    ],
)
def test_capture_option_parses(text, parsed, tmp_path):
    assert CollectConfig(out=tmp_path, capture=text).capture == parsed
    assert CollectConfig(out=tmp_path).capture is None  # decided by collect: new run or resume


@pytest.mark.parametrize("text", ["queries", "values", "keys,values", ""])
def test_capture_option_refuses_what_it_cannot_record(text, tmp_path):
    with pytest.raises(KeyspaceError, match="--capture"):
        CollectConfig(out=tmp_path, capture=text)


def test_keep_keys_sample_and_none(model_dir, corpus, tmp_path):
    sampled = collect(_cfg(model_dir, corpus, tmp_path / "s", keep_keys="50"))
    keys, positions, windows = RunFolder.open(sampled.out).kept_keys("post", 1)
    assert keys.shape[0] == 50
    assert len(set(zip(windows.tolist(), positions.tolist(), strict=True))) == 50
    none = collect(_cfg(model_dir, corpus, tmp_path / "n", keep_keys="none"))
    run = RunFolder.open(none.out)
    assert not run.has_kept_keys and run.is_complete
    torch.testing.assert_close(
        run.moments("pre").outer, RunFolder.open(sampled.out).moments("pre").outer
    )
    with pytest.raises(KeyspaceError, match="kept no"):
        run.kept_keys("pre", 0)


def test_resume_after_interrupt_is_identical(model_dir, corpus, tmp_path, monkeypatch):
    whole = collect(_cfg(model_dir, corpus, tmp_path / "whole"))
    err = cut_after_one_chunk(monkeypatch, _cfg(model_dir, corpus, tmp_path / "cut"))
    assert "Free some space" in err.hint and "--resume" in err.hint
    assert RunFolder.open(tmp_path / "cut").manifest.state == "partial"
    resumed = collect(_cfg(model_dir, corpus, tmp_path / "cut", resume=True))
    assert resumed.resumed_windows == 3 and resumed.state == "complete"
    _assert_same_run(whole.out, resumed.out)


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _moments_tensors(a), _moments_tensors(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name
    sa = {s.path: s.sha256 for s in RunFolder.open(a).manifest.shards}
    sb = {s.path: s.sha256 for s in RunFolder.open(b).manifest.shards}
    assert sa == sb


def test_existing_run_needs_resume_and_same_model(model_dir, corpus, tmp_path):
    collect(_cfg(model_dir, corpus, tmp_path / "run"))
    with pytest.raises(KeyspaceError, match="already holds a run"):
        collect(_cfg(model_dir, corpus, tmp_path / "run"))
    again = collect(_cfg(model_dir, corpus, tmp_path / "run", resume=True))
    assert again.state == "complete" and again.resumed_windows == 10
    other = save_tiny_model(tmp_path / "other-model", seed=1)
    with pytest.raises(KeyspaceError, match="different model"):
        collect(_cfg(other, corpus, tmp_path / "run", resume=True))
    with pytest.raises(KeyspaceError, match="arguments differ") as err:
        collect(_cfg(model_dir, corpus, tmp_path / "run", resume=True, window=16))
    assert err.value.hint == "Resume with the original arguments."
    # A run resumed with another --max-tokens (as after the default's change) is told which.
    recorded = RunFolder.open(tmp_path / "run").manifest.max_tokens
    with pytest.raises(KeyspaceError, match="arguments differ") as err:
        collect(_cfg(model_dir, corpus, tmp_path / "run", resume=True, max_tokens=recorded // 2))
    assert err.value.hint == f"Resume with the original arguments: --max-tokens {recorded}."


def test_damaged_shard_of_a_partial_run_is_recomputed_on_resume(
    model_dir, corpus, tmp_path, monkeypatch
):
    import keyspace.collect.runner as mod

    whole = collect(_cfg(model_dir, corpus, tmp_path / "whole"))
    real_commit = mod.commit_chunk
    calls = {"n": 0}

    def stop_after_first(*args):
        real_commit(*args)
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(mod, "commit_chunk", stop_after_first)
    with pytest.raises(KeyspaceError, match="resumable"):
        collect(_cfg(model_dir, corpus, tmp_path / "run"))
    monkeypatch.setattr(mod, "commit_chunk", real_commit)
    shard = next((tmp_path / "run" / "keys").rglob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncate
    resumed = collect(_cfg(model_dir, corpus, tmp_path / "run", resume=True))
    assert resumed.state == "complete" and "chunk 0" in " ".join(resumed.repairs)
    _assert_same_run(whole.out, resumed.out)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "moments flipped": lambda run: _flip(run / "moments.safetensors"),
    "moments deleted": lambda run: (run / "moments.safetensors").unlink(),
    "shard flipped": lambda run: _flip(next((run / "keys").rglob("r0-00001.safetensors"))),
    "shard deleted": lambda run: next((run / "keys").rglob("r0-00002.safetensors")).unlink(),
    "progress truncated": lambda run: (run / "progress" / "rank0.json").write_text('{"chunks'),
    "rank moments flipped": lambda run: _flip(next((run / "progress").glob("moments.*"))),
    "manifest truncated": lambda run: (run / "manifest.json").write_text('{"state": "comp'),
    "manifest deleted": lambda run: (run / "manifest.json").unlink(),
    "manifest shard hash edited": lambda run: _edit_manifest(
        run, lambda m: m["shards"][0].update(sha256="0" * 64)
    ),
}


def _edit_manifest(run: Path, edit) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    edit(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def complete_run(model_dir, corpus, tmp_path_factory):
    return collect(_cfg(model_dir, corpus, tmp_path_factory.mktemp("complete") / "run")).out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_the_hint_for_a_damaged_complete_run_really_repairs_it(complete_run, tmp_path, damage):
    """analyze refuses the damaged run; the command its hint names restores it bit for bit."""
    import shlex
    import shutil

    run = tmp_path / "my run"  # a space: the hint's command must be quoted
    shutil.copytree(complete_run, run)
    DAMAGE[damage](run)
    runner = CliRunner()
    refused = runner.invoke(app, ["verify", str(run)])
    assert refused.exit_code == 2 and refused.stderr.count("Error:") == 1, refused.output
    hint = refused.stderr.split("Hint:", 1)[1]
    repair = shlex.split(hint.split("`")[1])
    assert repair[:3] == ["keyspace", "collect", "--resume"], hint
    repaired = runner.invoke(app, repair[1:])
    assert repaired.exit_code == 0, repaired.output
    assert "Repaired" in repaired.stderr or damage.startswith("manifest")
    assert runner.invoke(app, ["verify", str(run)]).exit_code == 0
    _assert_same_run(complete_run, run)
    assert runner.invoke(app, ["analyze", str(run)]).exit_code == 0


def test_second_collector_is_refused(model_dir, corpus, tmp_path):
    from keyspace.collect.checkpoint import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, 0), pytest.raises(KeyspaceError, match="another collector"):
        collect(_cfg(model_dir, corpus, out))


def test_bad_inputs(model_dir, corpus, tmp_path):
    with pytest.raises(KeyspaceError, match="window"):
        _cfg(model_dir, corpus, tmp_path / "a", window=1)
    with pytest.raises(KeyspaceError, match="unknown model"):
        collect(_cfg("no-such-alias", corpus, tmp_path / "b"))
    with pytest.raises(KeyspaceError, match="does not exist"):
        collect(_cfg(str(tmp_path / "missing.gguf"), corpus, tmp_path / "c"))
    with pytest.raises(KeyspaceError, match="not found"):
        collect(_cfg(model_dir, tmp_path / "nope.txt", tmp_path / "d"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(KeyspaceError, match="empty"):
        collect(_cfg(model_dir, empty, tmp_path / "e"))
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(KeyspaceError, match="fewer than one window"):
        collect(_cfg(model_dir, short, tmp_path / "f"))
    for folder in "bcdef":
        assert not (tmp_path / folder / "manifest.json").exists()


def test_cli_errors_are_one_line_exit_2(model_dir, corpus, tmp_path):
    runner = CliRunner()
    cases = [
        ["--model", "nope", "--dataset", str(corpus)],
        ["--model", str(model_dir), "--dataset", str(corpus), "--window", "1"],
        ["--model", str(model_dir), "--dataset", str(corpus), "--keep-keys", "some"],
        ["--model", str(model_dir), "--dataset", str(tmp_path / "missing")],
    ]
    for args in cases:
        result = runner.invoke(app, ["collect", "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Hint:" in lines[0], (
            result.stderr
        )


def test_unsupported_architecture_writes_nothing(corpus, tmp_path):
    from tiny_models import tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(
        folder
    )
    tiny_tokenizer().save_pretrained(folder)
    result = CliRunner().invoke(
        app,
        ["collect", "--model", str(folder), "--dataset", str(corpus), "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("Error: architecture gpt2 is not supported")
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_batch_size_does_not_change_the_moments(model_dir, corpus, tmp_path):
    one = collect(_cfg(model_dir, corpus, tmp_path / "b1", keep_keys="none"))
    four = collect(_cfg(model_dir, corpus, tmp_path / "b4", keep_keys="none", batch_size=4))
    a, b = _moments_tensors(one.out), _moments_tensors(four.out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-10, atol=1e-10)


def test_cli_json_summary(model_dir, corpus, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "collect",
            "--model",
            str(model_dir),
            "--dataset",
            str(corpus),
            "--out",
            str(tmp_path / "r"),
            "--window",
            "32",
            "--max-tokens",
            "64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "complete" and summary["tokens"] == 64


def _cli(*args, env=None):
    return [sys.executable, "-m", "keyspace", "collect", *args]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
def test_killed_then_resumed_is_bit_identical(model_dir, corpus, tmp_path, sig):
    big = write_corpus(tmp_path / "big.txt", repeats=2)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model on a shared 2-core machine
    args = ["--model", str(model_dir), "--dataset", str(big), "--window", "32"]
    args += ["--max-tokens", str(32 * 24), "--keep-keys", "all", "--shard-windows", "1"]
    subprocess.run(
        _cli(*args, "--out", str(tmp_path / "whole")),
        check=True,
        capture_output=True,
        env=one_thread,
    )
    n_windows = RunFolder.open(tmp_path / "whole").manifest.num_windows
    assert n_windows == 24
    proc = subprocess.Popen(
        _cli(*args, "--out", str(tmp_path / "killed")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=one_thread,
        # A shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored:
        # give the collector the default disposition, as a terminal's foreground job has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    progress = tmp_path / "killed" / "progress" / "rank0.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["chunks_done"] >= 3:
            os.kill(proc.pid, sig)
            break
        time.sleep(0.005)
    stderr = proc.communicate()[1]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, "collector finished before it could be killed"
        resume = _cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    else:  # one line that says how to resume, and the shell's exit code for SIGINT
        assert proc.returncode == 130, stderr
        lines = stderr.strip().splitlines()
        assert (
            len(lines) == 1 and lines[0].startswith("Interrupted: ") and "Traceback" not in stderr
        )
        command = shlex.split(lines[0].split("Hint:", 1)[1].split("`")[1])
        assert command[:3] == ["keyspace", "collect", "--resume"]
        resume = [sys.executable, "-m", *command]
    assert RunFolder.open(tmp_path / "killed").manifest.state == "partial"
    subprocess.run(resume, check=True, capture_output=True, env=one_thread)
    _assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_run_files_get_the_usual_permissions_and_next_is_quoted(model_dir, corpus, tmp_path):
    out = tmp_path / "my run"
    args = ["collect", "--model", str(model_dir), "--dataset", str(corpus), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--window", "32", "--max-tokens", "64"])
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    next_line = next(line for line in result.stdout.splitlines() if "Next:" in line)
    assert shlex.split(next_line.split("Next:", 1)[1])[2] == str(out)


def test_torchrun_two_ranks_match_one_process(model_dir, corpus, tmp_path):
    args = [
        "--model",
        str(model_dir),
        "--dataset",
        str(corpus),
        "--window",
        "32",
        "--max-tokens",
        str(WINDOW * 9),
        "--keep-keys",
        "all",
        "--shard-windows",
        "2",
    ]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), check=True, capture_output=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    # --standalone: the agent's rendezvous store binds port 0 (the OS picks a free one) and the
    # ranks join that same store, so no fixed port can be taken by a test running beside this one
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "keyspace",
        "collect",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (RunFolder.open(tmp_path / name) for name in ("one", "two"))
    for kind in ("pre", "post"):
        assert torch.equal(one.moments(kind).count, two.moments(kind).count)
        for part in ("sum", "outer"):
            expected, got = (getattr(r.moments(kind), part) for r in (one, two))
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    manifest = RunFolder.open(tmp_path / "two").require_complete().manifest
    assert manifest.world_size == 2 and {s.rank for s in manifest.shards} == {0, 1}
    keys_one = RunFolder.open(tmp_path / "one").kept_keys("post", 1)
    keys_two = RunFolder.open(tmp_path / "two").kept_keys("post", 1)
    order_one = torch.argsort(keys_one[2] * 1000 + keys_one[1])
    order_two = torch.argsort(keys_two[2] * 1000 + keys_two[1])
    torch.testing.assert_close(keys_two[0][order_two], keys_one[0][order_one])
