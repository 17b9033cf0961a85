"""The manifest: a run's identity, shapes and file list, parsed once into a typed, frozen object.

`Manifest.from_json(doc, path)` checks every field a later stage reads (types, ranges, the shard
table, sizes that must agree) and raises one KeyspaceError naming the file and the field.
`to_json()` gives back the document it was read from, with the typed fields written over it, so
a manifest read and written again is byte-identical, and fields this version does not interpret
(rotary, device, ...) survive. The checksum (`content_sha256`) is checked before parsing, by the
reader (`keyspace.runfolder.store.RunFolder.open`); it detects damage, not tampering.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from keyspace.errors import KeyspaceError
from keyspace.runfolder.files import CHECKSUM_FIELD
from keyspace.runfolder.moments import KINDS, MOMENTS

STATE_PARTIAL = "partial"
STATE_COMPLETE = "complete"
# Beyond these a manifest is not one collect wrote: refuse it before any loop runs over it.
MAX_WORLD_SIZE = 1 << 16
MAX_DIM = 1 << 20


class ManifestProblem(ValueError):
    """One field of a manifest is wrong: `field` names it (dotted), the message says how."""

    def __init__(self, field_name: str, why: str):
        super().__init__(f"{field_name} {why}")
        self.field = field_name


def _int(doc: dict, key: str, low: int = 0, high: int | None = None, where: str = "") -> int:
    value = doc.get(key)
    name = f"{where}{key}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestProblem(name, f"is {value!r}, not an integer")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise ManifestProblem(name, f"is {value}, not {bound}")
    return value


def _opt_int(doc: dict, key: str, low: int = 0, high: int | None = None) -> int | None:
    return None if doc.get(key) is None else _int(doc, key, low, high)


def _str(doc: dict, key: str, where: str = "", optional: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ManifestProblem(f"{where}{key}", f"is {value!r}, not a string")
    return value


def _object(doc: dict, key: str, optional: bool = False) -> dict:
    value = doc.get(key)
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise ManifestProblem(key, f"is {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True)
class ShardRecord:
    """One kept-keys shard: (kind, layer) of chunk `index` written by `rank`, `tokens` rows."""

    kind: str
    layer: int
    index: int
    path: str
    tokens: int
    sha256: str
    rank: int | None = None

    @classmethod
    def from_json(cls, doc: object, i: int, layers: int) -> ShardRecord:
        where = f"shards[{i}]."
        if not isinstance(doc, dict):
            raise ManifestProblem(f"shards[{i}]", "is not an object")
        kind = _str(doc, "kind", where)
        if kind not in KINDS:
            raise ManifestProblem(f"{where}kind", f"is {kind!r}, not one of {', '.join(KINDS)}")
        path = _str(doc, "path", where)
        if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise ManifestProblem(f"{where}path", f"{path!r} leaves the run folder")
        rank = None if doc.get("rank") is None else _int(doc, "rank", 0, MAX_WORLD_SIZE, where)
        return cls(
            kind=kind,
            layer=_int(doc, "layer", 0, layers - 1, where),
            index=_int(doc, "index", 0, where=where),
            path=path,
            tokens=_int(doc, "tokens", 0, where=where),
            sha256=_str(doc, "sha256", where),
            rank=rank,
        )

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"kind": self.kind, "layer": self.layer, "index": self.index}
        if self.rank is not None:
            doc["rank"] = self.rank
        return doc | {"path": self.path, "tokens": self.tokens, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """A run's manifest.json, checked. Optional fields are None in runs written before them."""

    state: str
    model_identity: str
    model_spec: str | None
    dataset_spec: str | None
    dataset_split: str | None
    window: int
    tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    shards: tuple[ShardRecord, ...]
    moments_sha256: str | None
    num_windows: int | None = None
    num_heads: int | None = None
    max_tokens: int | None = None
    keep_keys: str | None = None
    dtype: str | None = None
    capture: tuple[str, ...] = ("keys",)
    shard_windows: int | None = None
    world_size: int | None = None
    # Runs of several --window lengths: the lengths in cut order (`window` is the longest) and
    # the windows of each; () and None in a one-length run.
    window_lengths: tuple[int, ...] = ()
    window_counts: tuple[int, ...] | None = None
    source: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        return self.num_layers, self.num_kv_heads, self.head_dim

    @property
    def lengths(self) -> tuple[int, ...]:
        """The window lengths, in cut order: (window,) for a one-length run."""
        return self.window_lengths or (self.window,)

    @property
    def window_label(self) -> str:
        """'1024', or '1024+8192' for a run of several window lengths."""
        return "+".join(map(str, self.lengths))

    @property
    def is_complete(self) -> bool:
        return self.state == STATE_COMPLETE

    @classmethod
    def from_json(cls, doc: object, path: str | Path, hint: str = "") -> Manifest:
        """Parse and check a manifest document; one KeyspaceError naming `path` and the field."""
        try:
            return cls._parse(doc)
        except ManifestProblem as problem:
            raise KeyspaceError(f"{path} is damaged: {problem}.", hint) from None

    @classmethod
    def _parse(cls, doc: object) -> Manifest:
        if not isinstance(doc, dict):
            raise ManifestProblem("the document", "is not a JSON object")
        state = doc.get("state")
        if state not in (STATE_PARTIAL, STATE_COMPLETE):
            raise ManifestProblem("state", f"is {state!r}, not {STATE_PARTIAL} or {STATE_COMPLETE}")
        model, dataset = _object(doc, "model"), _object(doc, "dataset", optional=True)
        layers = _int(doc, "num_layers", 1, MAX_DIM)
        shards = doc.get("shards")
        if not isinstance(shards, list):
            raise ManifestProblem("shards", "is not a list")
        lengths, counts = _window_lengths(doc)
        manifest = cls(
            state=state,
            model_identity=_str(model, "identity", "model."),
            model_spec=_str(model, "spec", "model.", optional=True),
            dataset_spec=_str(dataset, "spec", "dataset.", optional=True),
            dataset_split=_str(dataset, "split", "dataset.", optional=True),
            window=max(lengths) if lengths else _int(doc, "window", 1, MAX_DIM * 1024),
            tokens=_int(doc, "tokens"),
            num_layers=layers,
            num_kv_heads=_int(doc, "num_kv_heads", 1, MAX_DIM),
            head_dim=_int(doc, "head_dim", 1, MAX_DIM),
            shards=tuple(ShardRecord.from_json(s, i, layers) for i, s in enumerate(shards)),
            moments_sha256=_moments_sha256(doc.get("moments")),
            num_windows=_opt_int(doc, "num_windows"),
            num_heads=_opt_int(doc, "num_heads", 1, MAX_DIM),
            max_tokens=_opt_int(doc, "max_tokens", 1),
            keep_keys=_keep_keys(doc),
            dtype=_str(doc, "dtype", optional=True),
            capture=_capture(doc),
            shard_windows=_opt_int(doc, "shard_windows", 1),
            world_size=_opt_int(doc, "world_size", 1, MAX_WORLD_SIZE),
            window_lengths=lengths,
            window_counts=counts,
            source=copy.deepcopy(doc),
        )
        manifest._check_sizes()
        return manifest

    def _check_sizes(self) -> None:
        """Sizes that must agree with each other: a resealed manifest could claim anything."""
        if self.window_counts is not None:
            self._check_mixed_sizes()
        elif self.num_windows is not None and self.num_windows * self.window != self.tokens:
            raise ManifestProblem(
                "tokens",
                f"is {self.tokens}, not num_windows × window = {self.num_windows * self.window}",
            )
        if self.world_size is not None and self.num_windows is not None:
            if self.world_size > max(self.num_windows, 1):
                raise ManifestProblem(
                    "world_size",
                    f"is {self.world_size}, more ranks than its {self.num_windows} windows",
                )
        ranks = {s.rank for s in self.shards if s.rank is not None}
        if self.world_size is not None and ranks and max(ranks) >= self.world_size:
            raise ManifestProblem(
                "world_size", f"is {self.world_size}, but a shard was written by rank {max(ranks)}"
            )
        kept = self.kept_per_layer
        if self.is_complete and kept is not None:
            for kind in KINDS:
                for layer in range(self.num_layers):
                    listed = sum(
                        s.tokens for s in self.shards if (s.kind, s.layer) == (kind, layer)
                    )
                    if listed != kept:
                        raise ManifestProblem(
                            "shards",
                            f"hold {listed} {kind} keys of layer {layer}, not the {kept} kept",
                        )

    def _check_mixed_sizes(self) -> None:
        counts = self.window_counts or ()
        if self.num_windows != sum(counts):
            raise ManifestProblem(
                "num_windows", f"is {self.num_windows}, not the sum of window_counts {sum(counts)}"
            )
        tokens = sum(n * length for n, length in zip(counts, self.lengths, strict=True))
        if self.tokens != tokens:
            raise ManifestProblem(
                "tokens", f"is {self.tokens}, not Σ window_counts × window lengths = {tokens}"
            )

    @property
    def kept_per_layer(self) -> int | None:
        """Keys a complete run keeps per (kind, layer) under its --keep-keys; None when unrecorded."""
        if self.keep_keys == "all":
            return self.tokens
        if self.keep_keys == "none":
            return 0
        if self.keep_keys is not None and self.keep_keys.isascii() and self.keep_keys.isdigit():
            return min(int(self.keep_keys), self.tokens)
        return None

    def to_json(self) -> dict:
        """The document: the one read, with the typed fields written over it (same key order)."""
        doc = copy.deepcopy(self.source)
        doc.pop(CHECKSUM_FIELD, None)
        top = {
            "state": self.state,
            "window": self.window if self.window_counts is None else self.window_label,
            "tokens": self.tokens,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_windows": self.num_windows,
            "num_heads": self.num_heads,
            "max_tokens": self.max_tokens,
            "keep_keys": self.keep_keys,
            "dtype": self.dtype,
            "shard_windows": self.shard_windows,
            "world_size": self.world_size,
            "window_counts": None if self.window_counts is None else list(self.window_counts),
        }
        for key, value in top.items():
            if value is not None or key in doc:
                doc[key] = value
        if "capture" in doc or self.capture != ("keys",):
            doc["capture"] = list(self.capture)
        doc["model"] = {**doc.get("model", {}), "identity": self.model_identity}
        _put(doc["model"], "spec", self.model_spec)
        if doc.get("dataset") is not None or self.dataset_spec is not None:
            doc["dataset"] = dict(doc.get("dataset") or {})
            _put(doc["dataset"], "spec", self.dataset_spec)
            _put(doc["dataset"], "split", self.dataset_split)
        doc["shards"] = [s.to_json() for s in self.shards]
        if self.moments_sha256 is not None or "moments" in doc:
            sha = self.moments_sha256
            doc["moments"] = None if sha is None else {"path": MOMENTS, "sha256": sha}
        return doc


def _put(doc: dict, key: str, value: object) -> None:
    if value is not None or key in doc:
        doc[key] = value


def _moments_sha256(record: object) -> str | None:
    if record is None:
        return None
    if not (
        isinstance(record, dict)
        and record.get("path") == MOMENTS
        and isinstance(record.get("sha256"), str)
    ):
        raise ManifestProblem("moments", f"is {record!r}, not {{path: {MOMENTS}, sha256: ...}}")
    return record["sha256"]


def _window_lengths(doc: dict) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """A run of several --window lengths records `window` as "1024+8192" and `window_counts`
    (windows of each length); a run without window_counts has one length, `window` (an int)."""
    counts, label = doc.get("window_counts"), doc.get("window")
    if counts is None:
        return (), None
    if not isinstance(label, str) or not all(
        part.isascii() and part.isdigit() and len(part) <= 12 for part in label.split("+")
    ):
        raise ManifestProblem("window", f"is {label!r}, not lengths joined by + (1024+8192)")
    lengths = tuple(int(part) for part in label.split("+"))
    if len(lengths) < 2 or len(set(lengths)) != len(lengths):
        raise ManifestProblem("window", f"is {label!r}, not two or more different lengths")
    if any(not 1 <= n <= MAX_DIM * 1024 for n in lengths):
        raise ManifestProblem("window", f"is {label!r}, a length out of [1, {MAX_DIM * 1024}]")
    if not (
        isinstance(counts, list)
        and len(counts) == len(lengths)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts)
    ):
        raise ManifestProblem(
            "window_counts", f"is {counts!r}, not one count ≥ 1 per length of {label}"
        )
    return lengths, tuple(counts)


def _keep_keys(doc: dict) -> str | None:
    keep = doc.get("keep_keys")
    if keep is None:
        return None
    if not isinstance(keep, str) or not (
        keep in ("all", "none") or (keep.isascii() and keep.isdigit())
    ):
        raise ManifestProblem("keep_keys", f"is {keep!r}, not all, none or a count")
    return keep


def _capture(doc: dict) -> tuple[str, ...]:
    """What a run captured; runs written before queries existed captured keys only."""
    capture = doc.get("capture")
    if capture is None:
        return ("keys",)
    if not (
        isinstance(capture, list) and capture and all(c in ("keys", "queries") for c in capture)
    ):
        raise ManifestProblem("capture", f"is {capture!r}, not a list of keys, queries")
    return tuple(capture)
