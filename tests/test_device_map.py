"""--device-map / --max-memory on collect and validate, on the CPU: a tiny model dispatched by
accelerate over {"cpu", "disk"} (explicit map, and `auto` under a --max-memory that spills to
disk) and over a many-entry CPU map gives the single-device run's moments and perplexity; the
random-init shapes (`--model config:NAME`); one Error line for every bad option."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch
from loki_fixtures import synthetic_model_run
from safetensors.torch import load_file
from tiny_models import save_tiny_model, write_corpus
from typer.testing import CliRunner

from keyspace.cli.main import app
from keyspace.collect.runner import CollectConfig, collect
from keyspace.models import configs
from keyspace.models.loading import load_model, resolve_spec
from keyspace.models.placement import Placement, input_device, parse_max_memory

WINDOW = 32
# Layer 1 and the head on "disk", the rest on "cpu": accelerate streams the disk weights in.
CPU_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
# One entry per module, all on the CPU.
CPU_ENTRIES = {name: "cpu" for name in CPU_DISK}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


@pytest.fixture(scope="module")
def single_run(model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    collect(_cfg(model_dir, corpus, out, device="cpu"))
    return out


def _cfg(model_dir, corpus, out, **kw) -> CollectConfig:
    args = dict(
        model=str(model_dir),
        dataset=str(corpus),
        out=out,
        window=WINDOW,
        max_tokens=WINDOW * 4,
        keep_keys="all",
        shard_windows=2,
    )
    return CollectConfig(**{**args, **kw})


def _map_file(tmp_path, device_map: dict, name: str = "map.json"):
    path = tmp_path / name
    path.write_text(json.dumps(device_map))
    return path


def _assert_same_moments(run, reference):
    got, want = (
        load_file(str(run / "moments.safetensors")),
        load_file(str(reference / "moments.safetensors")),
    )
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("device_map", [CPU_DISK, CPU_ENTRIES], ids=["cpu+disk", "cpu-entries"])
def test_collect_over_a_map_file_equals_one_device(
    model_dir, corpus, single_run, tmp_path, device_map
):
    out, offload = tmp_path / "run", tmp_path / "offload"
    args = ["--device-map", str(_map_file(tmp_path, device_map)), "--offload-folder", str(offload)]
    result = _collect_cli(model_dir, corpus, out, *args)
    assert result.exit_code == 0, result.output
    _assert_same_moments(out, single_run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device_map"] == device_map and manifest["device"] == "cpu"
    assert (
        offload.is_dir()
    )  # a folder the user names is kept (safetensors weights are read in place)


def test_collect_auto_spills_to_disk_and_removes_its_scratch_folder(
    model_dir, corpus, single_run, tmp_path
):
    out = tmp_path / "run"
    result = _collect_cli(
        model_dir, corpus, out, "--device-map", "auto", "--max-memory", "cpu=100KB"
    )
    assert result.exit_code == 0, result.output
    _assert_same_moments(out, single_run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "disk" in manifest["device_map"].values()
    gc.collect()  # the scratch offload folder goes with the model
    assert not [p for p in out.iterdir() if p.name.startswith(".offload-")]


def test_resume_command_repeats_the_placement_options_as_given(
    model_dir, corpus, single_run, tmp_path
):
    """The manifest records --device-map, --max-memory, --offload-folder as given (and nothing
    for a run without them); the resume hint repeats them, shell-quoted, and runs."""
    import shlex

    from keyspace.runfolder.store import RunFolder, resume_command

    out, offload = tmp_path / "run", tmp_path / "off load"
    given = {"device_map": "auto", "max_memory": "cpu=100KB", "offload_folder": str(offload)}
    args = [
        word for name, value in given.items() for word in (f"--{name.replace('_', '-')}", value)
    ]
    result = _collect_cli(model_dir, corpus, out, *args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["placement_options"] == given
    words = shlex.split(RunFolder.open(out).resume_command)
    assert words[:3] == ["keyspace", "collect", "--resume"]
    flags = dict(zip(words[3::2], words[4::2], strict=True))
    assert {flag: flags.get(flag) for flag in args[::2]} == dict(
        zip(args[::2], args[1::2], strict=True)
    )
    again = CliRunner().invoke(app, words[1:])  # `keyspace collect --resume ...` as printed
    assert again.exit_code == 0, again.output
    plain = json.loads((single_run / "manifest.json").read_text())
    assert "placement_options" not in plain  # a run on one device: the manifest as before
    assert "--device-map" not in resume_command(plain, single_run)


def _collect_cli(model_dir, corpus, out, *args):
    base = ["collect", "--model", str(model_dir), "--dataset", str(corpus), "--out", str(out)]
    sizes = ["--window", str(WINDOW), "--max-tokens", str(WINDOW * 4), "--keep-keys", "all"]
    return CliRunner().invoke(app, [*base, *sizes, "--shard-windows", "2", *args])


# --- validate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    write_corpus(root / "corpus.txt")
    return root, synthetic_model_run(root)


def _validate(root, run, *args):
    base = ["validate", "--run", str(run), "--dataset", str(root / "corpus.txt"), "--window", "64"]
    grid = ["--max-tokens", "128", "--methods", "loki,full", "--d", "4", "--k", "0.25"]
    more = ["--recall-windows", "0", "--decode-prompts", "1", "--decode-prompt-tokens", "32"]
    result = CliRunner().invoke(app, [*base, *grid, *more, "--decode-tokens", "4", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_validate_over_cpu_and_disk_equals_one_device(synthetic, tmp_path):
    root, run = synthetic
    single = _validate(root, run, "--out", str(tmp_path / "single"))
    spread = _validate(
        root,
        run,
        "--out",
        str(tmp_path / "spread"),
        "--device-map",
        str(_map_file(tmp_path, CPU_DISK)),
        "--offload-folder",
        str(tmp_path / "offload"),
    )
    ppl = {(r["method"], r["d"], r["k"]): r["ppl"] for r in single["results"]}
    assert {(r["method"], r["d"], r["k"]): r["ppl"] for r in spread["results"]} == pytest.approx(
        ppl, rel=1e-12
    )
    assert len(ppl) == 2 and all(v > 1 for v in ppl.values())
    # LokiCache decoding through accelerate's hooks: the same tokens, the same NLL
    for a, b in zip(single["decode"], spread["decode"], strict=True):
        assert b["token_agreement"] == a["token_agreement"]
        assert b["nll_sparse"] == pytest.approx(a["nll_sparse"], rel=1e-9)
    assert spread["device"] == "device-map" and spread["device_map"] == CPU_DISK
    assert single["device"] == "cpu"


# --- random-init shapes ------------------------------------------------------------------------

TINY_SHAPE = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 256,
}


def test_random_shape_is_seeded_and_dispatches(monkeypatch, tmp_path):
    """`config:NAME` is drawn per module from a fixed seed, the same with and without a map."""
    monkeypatch.setitem(configs.MODEL_CONFIGS, "tiny-test", TINY_SHAPE)
    plain = load_model("config:tiny-test")
    spread_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    placement = Placement(spread_map, offload_folder=tmp_path / "offload")
    spread = load_model("config:tiny-test", placement=placement)
    assert any(p.suffix == ".dat" for p in (tmp_path / "offload").iterdir())  # disk weights
    assert plain.identity == spread.identity == "random:tiny-test:seed=0:drawn-on=cpu"
    ids = plain.tokenizer("keys live in a low dimensional space", return_tensors="pt").input_ids
    assert int(ids.max()) < TINY_SHAPE["vocab_size"]
    with torch.inference_mode():
        torch.testing.assert_close(
            spread.model(ids).logits, plain.model(ids).logits, rtol=0, atol=0
        )
    assert input_device(spread.model) == torch.device("cpu")
    weights = dict(plain.model.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    assert 0.01 < float(weights.detach().std()) < 0.03  # the config's initializer_range, not zeros


def test_llama3_70b_shape():
    config = configs.named_config("llama3-70b")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    assert 70.0e9 < sum(p.numel() for p in model.parameters()) < 71.0e9
    assert resolve_spec("config:llama3-70b") == ("config", "llama3-70b")


# --- bad options: one Error line, exit 2 ---------------------------------------------------------


def test_max_memory_parses_strictly():
    assert parse_max_memory("0=70GiB,1=1.5GB,cpu=200GiB") == {
        0: 70 << 30,
        1: 1_500_000_000,
        "cpu": 200 << 30,
    }


def _bad_maps(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    return {
        "missing file": ["--device-map", str(tmp_path / "absent.json")],
        "fifo": ["--device-map", str(fifo)],
        "not json": ["--device-map", str(_write(tmp_path / "bad.json", "{oops"))],
        "empty": ["--device-map", str(_map_file(tmp_path, {}, "empty.json"))],
        "a list": ["--device-map", str(_write(tmp_path / "list.json", '["cpu"]'))],
        "bad device": ["--device-map", str(_map_file(tmp_path, {"model": "gpu7"}, "dev.json"))],
        "bool device": ["--device-map", str(_map_file(tmp_path, {"model": True}, "bool.json"))],
        "bad module": ["--device-map", str(_map_file(tmp_path, {"model/../x": 0}, "mod.json"))],
        "unknown strategy": ["--device-map", "everywhere"],
        "both": ["--device", "cpu", "--device-map", "auto"],
        "max-memory alone": ["--max-memory", "cpu=1GiB"],
        "offload alone": ["--offload-folder", str(tmp_path / "off")],
        "max-memory with a file": [
            "--device-map",
            str(_map_file(tmp_path, CPU_ENTRIES, "ok.json")),
            "--max-memory",
            "cpu=1GiB",
        ],
        "negative size": ["--device-map", "auto", "--max-memory", "cpu=-1GiB"],
        "zero size": ["--device-map", "auto", "--max-memory", "cpu=0"],
        "twice": ["--device-map", "auto", "--max-memory", "0=1GiB,0=2GiB"],
        "unit": ["--device-map", "auto", "--max-memory", "0=1ZiB"],
        "non-ascii": ["--device-map", "auto", "--max-memory", "cpu=１GiB"],
        "bad device key": ["--device-map", "auto", "--max-memory", "gpu=1GiB"],
    }


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", ["collect", "validate"])
def test_bad_maps_and_limits_are_one_error_line(command, model_dir, tmp_path):
    base = {
        "collect": ["collect", "--model", str(model_dir), "--out", str(tmp_path / "run")],
        "validate": ["validate", "--run", str(tmp_path)],
    }[command]
    for case, args in _bad_maps(tmp_path).items():
        result = CliRunner().invoke(app, [*base, *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, (case, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (case, result.output)
        assert "Traceback" not in result.output, case
        assert any(word in lines[0] for word in ("--device", "--max-memory", "--offload", ".json"))
    assert not (tmp_path / "run").exists()
