"""Where a model's layers live: one device (`--device`), or a device map through accelerate
(`--device-map auto|balanced|sequential|<json file>`, `--max-memory 0=70GiB,cpu=200GiB`).

The options are parsed here, strictly, without importing torch (the CLI reads the configs at
start-up). A map spreads layers over the GPUs, then the CPU, then the disk; transformers'
`from_pretrained` (or `dispatch_model` for a random-init model) does the work, and accelerate's
hooks move each layer's inputs to its device. Weights mapped to "disk" live in an offload
folder: the one given, or a scratch folder removed when the model is freed.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyspace.errors import KeyspaceError
from keyspace.runfolder.files import read_regular

STRATEGIES = ("auto", "balanced", "sequential")
_DEVICE = re.compile(r"(cpu|disk|mps|cuda(:\d{1,3})?|\d{1,3})")
_MODULE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SIZE = re.compile(r"(\d{1,15})(\.\d{1,6})?\s?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?")
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
MAX_BYTES = 1 << 60  # above this a size is a typo
MAP_EXAMPLE = '{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "": "disk"}'


@dataclass(frozen=True)
class Placement:
    """A device map and what accelerate needs with it.

    device_map:     "auto", "balanced", "sequential", or {module name: device} ("" is the whole
        model; a device is a GPU index, "cuda:N", "cpu" or "disk")
    max_memory:     {GPU index or "cpu"/"disk": bytes} for the named strategies, or None
    offload_folder: where "disk" weights go; None: a scratch folder under `scratch_parent`
    """

    device_map: str | dict[str, int | str]
    max_memory: dict[int | str, int] | None = None
    offload_folder: Path | None = None
    scratch_parent: Path | None = None

    def with_scratch(self, parent: Path) -> Placement:
        return Placement(self.device_map, self.max_memory, self.offload_folder, Path(parent))

    def describe(self) -> str | dict:
        """The map as the manifest records it."""
        return self.device_map


def _map_error(what: str) -> KeyspaceError:
    return KeyspaceError(
        f"--device-map {what}",
        f"Use auto, balanced, sequential, or a JSON file mapping module names to devices, e.g. {MAP_EXAMPLE}.",
    )


def _device_value(value: object, where: str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1000:
        return value
    if isinstance(value, str) and value.isascii() and _DEVICE.fullmatch(value):
        return int(value) if value.isdigit() else value
    raise _map_error(f"{where}: {value!r} is not a device (a GPU index, cuda:N, cpu or disk).")


def parse_device_map(text: str) -> str | dict[str, int | str]:
    """ "auto" / "balanced" / "sequential", or the path of a JSON file read as a regular file and
    checked: a non-empty object of module names (or "") to devices."""
    if text in STRATEGIES:
        return text
    path = Path(text)
    if not path.suffix == ".json":
        raise _map_error(f"must be {', '.join(STRATEGIES)} or a .json file, got {text!r}.")
    hint = f"Give a JSON file like {MAP_EXAMPLE}."
    try:
        doc = json.loads(read_regular(path, hint, follow_links=True))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _map_error(f"file {text} is not valid JSON ({err}).") from None
    if not isinstance(doc, dict) or not doc:
        raise _map_error(f"file {text} must hold a non-empty JSON object.")
    device_map: dict[str, int | str] = {}
    for name, value in doc.items():
        if name and not (name.isascii() and _MODULE.fullmatch(name)):
            raise _map_error(f"file {text}: {name!r} is not a module name.")
        device_map[name] = _device_value(value, f"file {text}, module {name!r}")
    return device_map


def parse_max_memory(text: str) -> dict[int | str, int]:
    """accelerate's max_memory as one option: "0=70GiB,1=70GiB,cpu=200GiB" -> {0: bytes, 1: bytes,
    "cpu": bytes}. Sizes take B, KB/MB/GB/TB (powers of 10) or KiB/MiB/GiB/TiB; a bare number is bytes."""
    hint = "Example: --max-memory 0=70GiB,1=70GiB,cpu=200GiB (a GPU index or cpu, = a size)."
    limits: dict[int | str, int] = {}
    for part in text.split(","):
        device, _, size = part.strip().partition("=")
        device, size = device.strip(), size.strip()
        ok_device = device.isascii() and (device in ("cpu", "disk", "mps") or device.isdigit())
        match = _SIZE.fullmatch(size) if size.isascii() else None
        if not ok_device or len(device) > 3 or match is None:
            raise KeyspaceError(f"--max-memory: cannot read {part.strip()!r}.", hint)
        key = int(device) if device.isdigit() else device
        whole, fraction, unit = match.groups()
        amount = int(float(whole + (fraction or "")) * _UNITS[unit])
        if key in limits or not 0 < amount <= MAX_BYTES:
            problem = "names a device twice" if key in limits else "needs a size above 0 B"
            raise KeyspaceError(f"--max-memory {problem}: {part.strip()!r}.", hint)
        limits[key] = amount
    return limits


def placement_from_options(
    device: str | None,
    device_map: str | None,
    max_memory: str | None,
    offload_folder: Path | str | None,
) -> Placement | None:
    """The Placement the options ask for (None: one device, `--device`); conflicts are errors."""
    if device_map is None:
        for flag, value in (("--max-memory", max_memory), ("--offload-folder", offload_folder)):
            if value is not None:
                raise KeyspaceError(
                    f"{flag} needs --device-map.",
                    f"Add --device-map auto, or drop {flag}.",
                )
        return None
    if device is not None:
        raise KeyspaceError(
            f"--device {device} and --device-map {device_map} both place the model.",
            "Give one: --device for one device, --device-map to spread the layers.",
        )
    parsed = parse_device_map(device_map)
    limits = parse_max_memory(max_memory) if max_memory is not None else None
    if limits is not None and isinstance(parsed, dict):
        raise KeyspaceError(
            "--max-memory applies to --device-map auto, balanced or sequential, not to a map file.",
            "Drop --max-memory, or let accelerate build the map with --device-map auto.",
        )
    folder = Path(offload_folder) if offload_folder is not None else None
    return Placement(parsed, limits, folder)


def offload_folder(placement: Placement) -> tuple[str, Callable[[], None]]:
    """(the folder for "disk" weights, what removes it): the one given (kept), else a scratch
    folder under `scratch_parent` (the run), removed by the returned call."""
    if placement.offload_folder is not None:
        placement.offload_folder.mkdir(parents=True, exist_ok=True)
        return str(placement.offload_folder), lambda: None
    parent = placement.scratch_parent or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=".offload-", dir=parent)
    return folder, lambda: shutil.rmtree(folder, ignore_errors=True)


def remove_with(model: Any, cleanup: Callable[[], None]) -> None:
    """Run `cleanup` when `model` is freed (its offloaded weights are read until then), or at exit."""
    weakref.finalize(model, cleanup)


def input_device(model: Any) -> Any:
    """Where the model's input ids go: the embedding's execution device under a device map (its
    weights may sit on "meta" when offloaded), else the device of the model's parameters."""
    import torch

    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,))  # a SequentialHook holds several
    found = [getattr(h, "execution_device", None) for h in hooks]
    device = next((d for d in found if d is not None), None)
    if device is None:
        device = next(model.parameters()).device
    if isinstance(device, int):
        device = f"cuda:{device}"
    device = torch.device(device)
    return torch.device("cpu") if device.type == "meta" else device


def strategy_map(model: Any, placement: Placement, dtype: Any) -> dict[str, int | str]:
    """accelerate's map for "auto" / "balanced" (layers balanced over the GPUs, as transformers
    does) or "sequential" (fill GPU 0 first), within `max_memory`; `model` may be on "meta"."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = model._no_split_modules
    max_memory = placement.max_memory
    if placement.device_map != "sequential":
        max_memory = get_balanced_memory(
            model, max_memory, no_split_module_classes=no_split, dtype=dtype, low_zero=False
        )
    return infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )


def from_pretrained_kwargs(placement: Placement) -> tuple[dict[str, Any], Callable[[], None]]:
    """(the keyword arguments of `from_pretrained` for this placement, the offload folder's cleanup)."""
    folder, cleanup = offload_folder(placement)
    kwargs: dict[str, Any] = {"device_map": placement.device_map, "offload_folder": folder}
    if placement.max_memory is not None:
        kwargs["max_memory"] = placement.max_memory
    return kwargs, cleanup


def placed_map(model: Any, placement: Placement | None) -> dict | str | None:
    """The device map a run records: accelerate's, else the one asked for (transformers keeps
    none when every module lands on one device), else None (one device, `--device`)."""
    if placement is None:
        return None
    return getattr(model, "hf_device_map", None) or placement.device_map
