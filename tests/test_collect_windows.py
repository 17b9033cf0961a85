"""collect --window 16,48: windows of several lengths in one run (issue 23, item 3).

The moments are checked against keys computed here from the tiny model's weights over the windows
the corpus should give; one length gives today's run; resume after an interruption; bad lists.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import cut_after_one_chunk, save_tiny_model, write_corpus
from typer.testing import CliRunner

from keyspace.cli.main import app
from keyspace.collect.config import CollectConfig
from keyspace.collect.runner import collect
from keyspace.errors import KeyspaceError
from keyspace.runfolder.store import RunFolder

LENGTHS = (16, 48)
MAX_TOKENS = 192  # 96 tokens per length: 6 windows of 16, then 2 of 48
COUNTS = (6, 2)


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
        window="16,48",
        max_tokens=MAX_TOKENS,
        keep_keys="all",
        shard_windows=4,  # chunk 1 holds windows 4, 5 (16 tokens) and 6, 7 (48 tokens)
        batch_size=3,
    )
    return CollectConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def mixed_run(model_dir, corpus, tmp_path_factory):
    return collect(_cfg(model_dir, corpus, tmp_path_factory.mktemp("mixed") / "run")).out


def _keys_by_hand(model_dir, corpus) -> dict[str, list[torch.Tensor]]:
    """Pre- and post-RoPE keys per layer, (tokens, kv_heads, D), over the expected windows, from
    the model's own k_proj and rotary tables: no keyspace code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = tokenizer(Path(corpus).read_text(), add_special_tokens=False).input_ids
    assert tokenizer.bos_token_id is None  # no BOS per window: windows are plain slices
    windows, start = [], 0
    for length, count in zip(LENGTHS, COUNTS, strict=True):  # consecutive: 16s first, then 48s
        for _ in range(count):
            windows.append(torch.tensor(ids[start : start + length])[None])
            start += length
    kv_heads, head_dim = model.config.num_key_value_heads, 16
    got: dict[str, list] = {"pre": [[] for _ in model.model.layers], "post": []}
    got["post"] = [[] for _ in model.model.layers]
    for i, layer in enumerate(model.model.layers):

        def hook(module, inputs, output, i=i):
            keys = output.reshape(1, -1, kv_heads, head_dim).transpose(1, 2)  # (1, H, T, D)
            positions = torch.arange(keys.shape[2])[None]
            cos, sin = model.model.rotary_emb(keys, positions)
            _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
            got["pre"][i].append(keys[0].transpose(0, 1))
            got["post"][i].append(rotated[0].transpose(0, 1))

        layer.self_attn.k_proj.register_forward_hook(hook)
    with torch.no_grad():
        for window in windows:
            model(window)
    return {kind: [torch.cat(parts).double() for parts in per] for kind, per in got.items()}


def test_mixed_moments_match_keys_computed_by_hand(model_dir, corpus, mixed_run):
    run = RunFolder.open(mixed_run).require_complete()
    m = run.manifest
    assert (m.window_label, m.lengths, m.window, m.window_counts) == ("16+48", LENGTHS, 48, COUNTS)
    assert (m.num_windows, m.tokens) == (8, MAX_TOKENS)
    doc = json.loads((mixed_run / "manifest.json").read_text())
    assert (doc["window"], doc["window_counts"]) == ("16+48", [6, 2])
    expected = _keys_by_hand(model_dir, corpus)
    for kind in ("pre", "post"):
        moments = run.moments(kind)
        for layer in range(m.num_layers):
            x = expected[kind][layer]
            assert x.shape[0] == MAX_TOKENS
            assert float(moments.count[layer]) == MAX_TOKENS
            torch.testing.assert_close(moments.sum[layer], x.sum(0), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(
                moments.sum[layer] / MAX_TOKENS, x.mean(0), rtol=1e-6, atol=1e-7
            )
            torch.testing.assert_close(
                moments.outer[layer], torch.einsum("thi,thj->hij", x, x), rtol=1e-6, atol=1e-5
            )
            keys, positions, windows = run.kept_keys(kind, layer)
            order = sorted(zip(windows.tolist(), positions.tolist(), strict=True))
            assert order == [(w, p) for w in range(6) for p in range(16)] + [
                (w, p) for w in (6, 7) for p in range(48)
            ]


def test_mixed_batches_never_mix_lengths(model_dir, corpus, tmp_path, mixed_run, monkeypatch):
    """Batch size 3 over chunk [4, 5, 6, 7]: [4, 5] then [6, 7]; the moments equal batch size 1."""
    import keyspace.collect.runner as mod

    shapes = []
    real = mod.capture_keys

    def spy(model, on_keys, on_queries):
        def keys(kind, layer, k):
            if (kind, layer) == ("pre", 0):
                shapes.append(tuple(k.shape[:2]))
            on_keys(kind, layer, k)

        return real(model, keys, on_queries)

    monkeypatch.setattr(mod, "capture_keys", spy)
    one = collect(_cfg(model_dir, corpus, tmp_path / "one", batch_size=1, keep_keys="none"))
    assert shapes == [(1, 16)] * 6 + [(1, 48)] * 2
    shapes.clear()
    collect(_cfg(model_dir, corpus, tmp_path / "three", keep_keys="none"))
    assert shapes == [(3, 16), (1, 16), (2, 16), (2, 48)]  # chunks [0..3], [4..7]
    a, b = (load_file(str(p / "moments.safetensors")) for p in (one.out, mixed_run))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-9)


def test_one_length_is_todays_run(model_dir, corpus, tmp_path):
    """`--window 32` as text, int or a one-item tuple: the manifest of a run before lists existed
    (no window_counts, an int window, the same keys), and byte-identical files."""
    runs = [
        collect(_cfg(model_dir, corpus, tmp_path / name, window=w, max_tokens=320, shard_windows=3))
        for name, w in (("int", 32), ("text", "32"), ("tuple", (32,)))
    ]
    docs = [json.loads((r.out / "manifest.json").read_text()) for r in runs]
    for doc in docs:
        doc.pop("out"), doc.pop("content_sha256")
        assert doc == docs[0]
    assert docs[0]["window"] == 32 and "window_counts" not in docs[0]
    assert list(docs[0])[list(docs[0]).index("window") : list(docs[0]).index("tokens") + 1] == [
        "window",
        "num_windows",
        "max_tokens",
        "tokens",
    ]
    m = RunFolder.open(runs[0].out).manifest
    assert (m.window, m.lengths, m.window_counts, m.num_windows, m.tokens) == (
        32,
        (32,),
        None,
        10,
        320,
    )
    names = sorted(p.name for p in runs[0].out.iterdir())
    for r in runs[1:]:
        assert sorted(p.name for p in r.out.iterdir()) == names
        assert (r.out / "moments.safetensors").read_bytes() == (
            runs[0].out / "moments.safetensors"
        ).read_bytes()
    assert "--window 32 " in RunFolder.open(runs[0].out).resume_command


def test_resume_after_interrupt_gives_the_same_mixed_run(
    model_dir, corpus, tmp_path, mixed_run, monkeypatch
):
    # Chunk 0 (windows of 16) committed; chunk 1 (16s and 48s) not.
    err = cut_after_one_chunk(monkeypatch, _cfg(model_dir, corpus, tmp_path / "cut"))
    assert "--window 16+48" in err.hint
    partial = RunFolder.open(tmp_path / "cut")
    assert partial.manifest.state == "partial" and partial.manifest.lengths == LENGTHS
    # A different --window list is refused, like any other argument the run was made with.
    for other in ("48,16", "16", "16,48,32"):
        with pytest.raises(KeyspaceError, match="arguments differ.*window"):
            collect(_cfg(model_dir, corpus, tmp_path / "cut", resume=True, window=other))
    # The hint's own command resumes it.
    words = shlex.split(partial.resume_command)
    assert words[:2] == ["keyspace", "collect"] and "16+48" in words
    result = CliRunner().invoke(app, [*words[1:], "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["state"], summary["resumed_windows"], summary["windows"]) == ("complete", 4, 8)
    ma, mb = (load_file(str(p / "moments.safetensors")) for p in (mixed_run, tmp_path / "cut"))
    assert ma.keys() == mb.keys()
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name
    sa = {s.path: s.sha256 for s in RunFolder.open(mixed_run).manifest.shards}
    sb = {s.path: s.sha256 for s in RunFolder.open(tmp_path / "cut").manifest.shards}
    assert sa == sb


def test_downstream_reads_a_mixed_run(mixed_run, tmp_path):
    """verify, analyze and the rank report take a mixed run; the report says 16+48."""
    runner = CliRunner()
    verify = runner.invoke(app, ["verify", str(mixed_run)])
    assert verify.exit_code == 0, verify.output
    analyze = runner.invoke(app, ["analyze", str(mixed_run)])
    assert analyze.exit_code == 0, analyze.output
    report = runner.invoke(app, ["rank-report", str(mixed_run), "--out", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    pages = " ".join(p.read_text() for p in (tmp_path / "rep").rglob("*.html"))
    assert "16+48" in pages


def test_collect_again_repeats_every_window_length(mixed_run):
    """The "collect it again with queries" hint of a 16,48 run asks for --window 16,48."""
    from keyspace.runfolder.analysis import collect_again, queries_hint

    manifest = RunFolder.open(mixed_run).manifest
    words = shlex.split(collect_again(manifest, "/tmp/again").split(", then ")[0].strip("`"))
    flags = dict(zip(words[2::2], words[3::2], strict=True))
    assert flags["--window"] == "16,48" and int(flags["--max-tokens"]) == MAX_TOKENS
    assert "--window 16,48 " in queries_hint(mixed_run)
    words = shlex.split(collect_again(manifest, "/tmp/w", window=96).split(", then ")[0].strip("`"))
    assert words[words.index("--window") + 1] == "96"


def test_validate_says_the_calibration_windows_of_a_mixed_run(mixed_run, corpus, tmp_path):
    """validate.json and the report name the run's windows 16+48, not the longest alone."""
    runner = CliRunner()
    analyze = runner.invoke(app, ["analyze", str(mixed_run)])
    assert analyze.exit_code == 0, analyze.output
    args = ["validate", "--run", str(mixed_run), "--dataset", str(corpus), "--window", "16"]
    args += ["--max-tokens", "16", "--d", "4", "--k", "0.5", "--methods", "loki"]
    args += ["--decode-prompts", "0", "--recall-windows", "0", "--out", str(tmp_path / "v")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "v" / "validate.json").read_text())
    assert doc["calibration_window"] == "16+48"
    assert "calibrated on 16+48-token windows" in (tmp_path / "v" / "validate.html").read_text()


def _stopped_collect(monkeypatch) -> list:
    """Replace the collect stage by one that records its config and stops: the CLI's parse only."""
    seen = []

    def fake_collect(config, on_progress=None):
        seen.append(config)
        raise KeyspaceError("stop here.", "This is a test.")

    monkeypatch.setattr("keyspace.collect.runner.collect", fake_collect)
    return seen


def test_default_run_name_says_the_lengths(tmp_path, monkeypatch):
    """No suffix for what the auto --window gives (1024+8192, or 1024), named or not."""
    seen = _stopped_collect(monkeypatch)
    for window in (["--window", "1024,8192"], ["--window", "1024"], ["--window", "2048"], []):
        args = ["collect", "--model", "m", "--dataset", "pydoc", *window]
        CliRunner().invoke(app, [*args, "--max-tokens", "16384"])
    CliRunner().invoke(app, ["collect", "--model", "m", "--dataset", "pydoc"])
    CliRunner().invoke(
        app, ["collect", "--model", "m", "--dataset", "pydoc", "--max-tokens", "4096"]
    )
    assert [str(c.out) for c in seen] == [
        "runs/m-pydoc",
        "runs/m-pydoc",
        "runs/m-pydoc-w2048",
        "runs/m-pydoc",
        "runs/m-pydoc",
        "runs/m-pydoc",
    ]
    assert [c.window_lengths for c in seen] == [
        (1024, 8192),
        (1024,),
        (2048,),
        (1024, 8192),
        (1024, 8192),
        (1024,),
    ]


AUTO_NOTE = (
    "Note: --max-tokens 4096 is below 16384, so every window has 1024 tokens; the query-aware"
    " basis from them can lose long-range retrieval past 1024 tokens. For the default 1024+8192"
    " windows, give --max-tokens 32768."
)


@pytest.mark.parametrize(
    ("given", "lengths", "note"),
    [
        ({}, (1024, 8192), ""),  # the default --max-tokens, 32768
        ({"max_tokens": "all"}, (1024, 8192), ""),
        ({"max_tokens": "16384"}, (1024, 8192), ""),  # one 8192-token window of each length
        ({"max_tokens": "4096"}, (1024,), AUTO_NOTE),
        ({"max_tokens": 16383}, (1024,), AUTO_NOTE.replace("4096", "16383")),
        ({"window": "1024"}, (1024,), ""),  # an explicit --window always wins, without a note
        ({"window": "2048", "max_tokens": "4096"}, (2048,), ""),
        ({"window": "16,48", "max_tokens": "all"}, (16, 48), ""),
    ],
)
def test_auto_window_follows_max_tokens(tmp_path, given, lengths, note):
    cfg = CollectConfig(out=tmp_path / "r", **given)
    assert (cfg.window_lengths, cfg.window_note) == (lengths, note)
    assert cfg.max_tokens == {"all": None}.get(given.get("max_tokens"), cfg.max_tokens)
    assert CollectConfig(out=tmp_path / "r").max_tokens == 32768


def test_auto_window_note_is_one_stderr_line_and_explicit_window_keeps_its_error(
    tmp_path, monkeypatch
):
    from keyspace.collect.runner import CollectResult

    def finished_collect(config, on_progress=None):
        return CollectResult(config.out, "complete", 4, 4096, 1.0, "m", 1)

    monkeypatch.setattr("keyspace.collect.runner.collect", finished_collect)
    out = ["collect", "--out", str(tmp_path / "r")]
    done = CliRunner().invoke(app, [*out, "--max-tokens", "4096"])
    assert done.exit_code == 0 and done.stderr.splitlines() == [AUTO_NOTE]
    seen = _stopped_collect(monkeypatch)
    # A refused run: its Error line alone.
    small = CliRunner().invoke(app, [*out, "--max-tokens", "4096"])
    assert small.exit_code == 2 and small.stderr.splitlines() == [
        "Error: stop here. Hint: This is a test.",
    ]
    default = CliRunner().invoke(app, out)
    assert default.stderr.splitlines() == ["Error: stop here. Hint: This is a test."]
    assert [c.window_lengths for c in seen] == [(1024,), (1024, 8192)]
    explicit = CliRunner().invoke(app, [*out, "--window", "1024,8192", "--max-tokens", "4096"])
    assert explicit.exit_code == 2 and len(seen) == 2
    (line,) = explicit.stderr.strip().splitlines()
    assert (
        line.startswith("Error: --max-tokens 4096 split over 2 window lengths")
        and " Hint: " in line
    )


def test_resume_without_window_takes_the_runs_own(
    model_dir, corpus, tmp_path, monkeypatch, mixed_run
):
    """A run recorded with one length (as every run before the auto default) and one with two,
    each resumed with no --window: the same files as an uninterrupted run."""
    one = dict(window=16, max_tokens=96)
    whole = collect(_cfg(model_dir, corpus, tmp_path / "whole", **one)).out
    cut_after_one_chunk(monkeypatch, _cfg(model_dir, corpus, tmp_path / "cut16", **one))
    resumed = _cfg(model_dir, corpus, tmp_path / "cut16", resume=True, window=None, max_tokens=96)
    assert (resumed.window, resumed.window_note) == (16, "")
    assert collect(resumed).resumed_windows == 4
    cut_after_one_chunk(monkeypatch, _cfg(model_dir, corpus, tmp_path / "cut-mixed"))
    args = ["collect", "--resume", "--model", str(model_dir), "--dataset", str(corpus)]
    args += ["--out", str(tmp_path / "cut-mixed"), "--max-tokens", str(MAX_TOKENS)]
    args += ["--keep-keys", "all", "--shard-windows", "4", "--batch-size", "3", "--json"]
    result = CliRunner().invoke(app, args)  # no --window
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_windows"] == 4 and "Note:" not in result.stderr
    for a, b in ((whole, tmp_path / "cut16"), (mixed_run, tmp_path / "cut-mixed")):
        ma, mb = (load_file(str(p / "moments.safetensors")) for p in (a, b))
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma)
        sa, sb = ({s.path: s.sha256 for s in RunFolder.open(p).manifest.shards} for p in (a, b))
        assert sa == sb
    assert RunFolder.open(tmp_path / "cut-mixed").manifest.window_label == "16+48"
    # A --resume into a folder with no run yet is a new run: the auto rule.
    fresh = CollectConfig(out=tmp_path / "new", resume=True, max_tokens="4096")
    assert (fresh.window_lengths, fresh.window_note) == ((1024,), AUTO_NOTE)


HOSTILE = {
    "1024,,8192": "--window has an empty length",
    "1024,": "--window has an empty length",
    "0": "--window must be a whole number from 2",
    "1": "--window must be a whole number from 2",
    "-5": "--window must be a whole number from 2",
    "abc": "--window must be a whole number from 2",
    "1024,abc": "--window must be a whole number from 2",
    "1024,-5": "--window must be a whole number from 2",
    "1024,1024": "--window lists 1024 more than once",
    ",".join(str(16 * (i + 1)) for i in range(9)): "--window lists 9 lengths; at most 8",
}


@pytest.mark.parametrize("value", list(HOSTILE))
def test_bad_window_lists_are_one_error_line(tmp_path, value):
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["collect", "--out", str(out), f"--window={value}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {HOSTILE[value]}"), lines
    assert " Hint: " in lines[0] and "Traceback" not in result.output
    assert not out.exists()


def test_too_few_tokens_per_length_names_the_smallest_max_tokens(model_dir, corpus, tmp_path):
    out = tmp_path / "r"
    args = ["collect", "--out", str(out), "--window", "1024,8192", "--max-tokens", "16000"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("Error: --max-tokens 16000 split over 2 window lengths gives each 8000")
    assert "Use --max-tokens 16384 or more" in line and not out.exists()
    assert CollectConfig(out=out, window="1024,8192", max_tokens=16384).window == "1024+8192"
    # A corpus too short for one window of each length: the same kind of line, naming the text.
    short = tmp_path / "short.txt"
    short.write_text(Path(corpus).read_text()[:600])
    with pytest.raises(KeyspaceError, match="fewer than one window of 480") as err:
        collect(_cfg(model_dir, short, out, window="16,480", max_tokens="all"))
    assert "Give more text (at least 960 tokens)" in err.value.hint


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"window_counts": [6, 3]}, "num_windows is 8, not the sum of window_counts 9"),
        ({"window_counts": [6]}, "window_counts is [6], not one count"),
        ({"window": "16+16"}, "not two or more different lengths"),
        ({"window": "16,48"}, "not lengths joined by +"),
        ({"tokens": 200}, "tokens is 200, not Σ window_counts"),
        ({"window": 48}, "not lengths joined by +"),
    ],
)
def test_a_mixed_manifest_that_does_not_add_up_is_refused(mixed_run, edit, problem):
    from keyspace.runfolder.manifest import Manifest

    doc = RunFolder.open(mixed_run).manifest.to_json()
    assert Manifest.from_json(doc, "m.json").to_json() == doc  # read and written back unchanged
    with pytest.raises(KeyspaceError, match=f"^m.json is damaged: .*{re.escape(problem)}"):
        Manifest.from_json({**doc, **edit}, "m.json")


def test_auto_window_falls_back_to_its_first_length_on_a_short_corpus(
    model_dir, tmp_path, monkeypatch
):
    """No --window and a corpus too short for one window of each auto length: windows of the first
    length, one note line, and a manifest (so a resume) that says so. An explicit list still
    refuses such a corpus."""
    import keyspace.collect.config as config_mod

    monkeypatch.setattr(config_mod, "AUTO_WINDOW_LENGTHS", (16, 48))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = Path(write_corpus(tmp_path / "long.txt")).read_text().split()
    text = " ".join(words[:40])
    while len(tokenizer(text, add_special_tokens=False).input_ids) >= 96:  # < 2 windows of 48
        text = " ".join(text.split()[:-5])
    short = tmp_path / "short.txt"
    short.write_text(text)
    n_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    assert n_tokens >= 32  # room for windows of 16
    args = ["collect", "--model", str(model_dir), "--dataset", str(short), "--max-tokens", "all"]
    args += ["--out", str(tmp_path / "run"), "--keep-keys", "all", "--json"]
    result = CliRunner().invoke(app, args)  # no --window
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("Note:")]
    assert notes == [
        f"Note: the corpus gives {n_tokens} tokens, fewer than one window of each of 16+48 (at"
        " least 96 tokens), so every window has 16 tokens; the query-aware basis from them can"
        " lose long-range retrieval past 16 tokens. Give more text for the default mixed windows."
    ]
    manifest = RunFolder.open(tmp_path / "run").manifest
    assert manifest.window == 16 and manifest.window_counts is None
    assert json.loads(result.stdout)["windows"] == n_tokens // 16
    resumed = CollectConfig(out=tmp_path / "run", resume=True, max_tokens="all")
    assert resumed.window_lengths == (16,)
    explicit = _cfg(model_dir, short, tmp_path / "explicit", max_tokens=None)
    with pytest.raises(KeyspaceError, match="fewer than one window of 48"):
        collect(explicit)
