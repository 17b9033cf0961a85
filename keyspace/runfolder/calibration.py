"""The calibration file: per (kind, layer, KV head) bases that the Loki stage consumes.

Written by the analyzer into the run folder (`keyspace.runfolder.store.calibration_path`). Tensors, for kind in {pre, post}:
  `{kind}.mean`        (layers, kv_heads, head_dim)            float32
  `{kind}.components`  (layers, kv_heads, head_dim, head_dim)  float32, row i = i-th direction,
                                                                sorted by descending eigenvalue
  `{kind}.eigenvalues` (layers, kv_heads, head_dim)            float32, descending
and, when the run recorded queries (`collect --capture keys,queries`), the query-aware basis:
  `{kind}.score_key_transform`    (layers, kv_heads, D, D)  float32, A = Uᵀ S_q^½
  `{kind}.score_query_transform`  (layers, kv_heads, D, D)  float32, B = Uᵀ S_q^-½ = A⁻ᵀ
  `{kind}.score_eigenvalues`      (layers, kv_heads, D)     float32, descending score energy
A transform T applies as x̃ = T x (rows are output coordinates), so keys go k̃ = A k, queries
q̃ = B q, and q̃·k̃ = q·k. `components` is its own query transform (orthonormal).
Metadata (str -> str): model_identity, centered ("true"/"false"), tokens, keyspace_version,
queries ("true"/"false"; absent in files written before queries existed) and, with queries,
query_eigen_floor (S_q's eigenvalue floor relative to its largest; keyspace.analyze.spectra).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError
from keyspace.runfolder.files import parse_tensors, write_bytes_atomic

PARTS = ("mean", "components", "eigenvalues")
SCORE_PARTS = ("score_key_transform", "score_query_transform", "score_eigenvalues")
NO_QUERIES_HINT = (
    "Collect the run again with `keyspace collect ... --capture keys,queries` (the default),"
    " then `keyspace analyze` it."
)


@dataclass
class Calibration:
    """Bases per kind; each entry maps kind -> tensor with the shapes in the module docstring.

    The score_* parts are empty for runs collected without queries.
    """

    mean: dict[str, torch.Tensor]
    components: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    score_key_transform: dict[str, torch.Tensor] = field(default_factory=dict)
    score_query_transform: dict[str, torch.Tensor] = field(default_factory=dict)
    score_eigenvalues: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in self.components:
            comps = self.components[kind]
            if comps.dim() != 4 or comps.shape[-1] != comps.shape[-2]:
                raise ValueError(
                    f"{kind}.components must be (layers, kv_heads, D, D), got {tuple(comps.shape)}"
                )
            if (
                self.mean[kind].shape != comps.shape[:3]
                or self.eigenvalues[kind].shape != comps.shape[:3]
            ):
                raise ValueError(f"{kind}: mean/eigenvalues shape does not match components")
        scored = [set(getattr(self, part)) for part in SCORE_PARTS]
        if any(kinds != scored[0] or not kinds <= set(self.components) for kinds in scored):
            raise ValueError(f"the parts {', '.join(SCORE_PARTS)} must cover the same kinds")
        for kind in scored[0]:
            shape = self.components[kind].shape
            if (
                self.score_key_transform[kind].shape != shape
                or self.score_query_transform[kind].shape != shape
                or self.score_eigenvalues[kind].shape != shape[:3]
            ):
                raise ValueError(f"{kind}: score transform shapes do not match components")

    @property
    def model_identity(self) -> str:
        return self.metadata.get("model_identity", "")

    @property
    def has_queries(self) -> bool:
        return bool(self.score_key_transform)

    def score_transforms(self, kind: str, hint: str = NO_QUERIES_HINT) -> tuple[torch.Tensor, ...]:
        """(A, B) of the query-aware basis, each (layers, kv_heads, D, D): k̃ = A k, q̃ = B q.

        A calibration from a run without queries has none: a KeyspaceError says how to get them.
        """
        if kind not in self.score_key_transform:
            raise KeyspaceError(
                f"this calibration holds no query-aware basis for {kind}-RoPE keys: its run was"
                " collected without queries (--capture keys).",
                hint,
            )
        return self.score_key_transform[kind], self.score_query_transform[kind]

    def first_nonfinite(self) -> str | None:
        """Where the first NaN or Inf is ("post.components of layer 1, KV head 0"), or None."""
        for part in PARTS + SCORE_PARTS:
            for kind, tensor in getattr(self, part).items():
                bad = ~torch.isfinite(tensor.flatten(2)).all(dim=-1)  # (layers, kv_heads)
                if bad.any():
                    layer, head = (int(i) for i in bad.nonzero()[0])
                    return f"{kind}.{part} of layer {layer}, KV head {head}"
        return None

    def to_bytes(self) -> bytes:
        """The file's bytes: float32 tensors and str metadata, the same bytes for the same content."""
        from safetensors.torch import save

        tensors = {}
        for part in PARTS + SCORE_PARTS:
            for kind, tensor in getattr(self, part).items():
                tensors[f"{kind}.{part}"] = tensor.float().contiguous()
        metadata = {k: str(v) for k, v in self.metadata.items()}
        return canonical_safetensors(save(tensors, metadata=metadata))

    def save(self, path: str | Path) -> str:
        """Write the file atomically; returns its sha256."""
        return write_bytes_atomic(path, self.to_bytes())


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes: the header is a little-endian u64 length + JSON."""
    (length,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + length]).get("__metadata__") or {})


def calibration_from_bytes(data: bytes, path: Path, hint: str = "") -> Calibration:
    """Parse a calibration file already read (and verified); a malformed one names the file."""
    tensors = parse_tensors(data, path, hint)
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS + SCORE_PARTS}
    try:
        for name, tensor in tensors.items():
            kind, part = name.split(".", 1)
            parts[part][kind] = tensor
        calibration = Calibration(**parts, metadata=safetensors_metadata(data))
    except (KeyError, ValueError) as err:
        raise KeyspaceError(f"{path} is not a calibration file ({err}).", hint) from None
    where = calibration.first_nonfinite()
    if where is not None:
        raise KeyspaceError(f"{path} holds a NaN or Inf: {where}.", hint)
    return calibration


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header's metadata in sorted order, so that the same
    tensors and metadata always give the same bytes (safetensors writes metadata from a hash map,
    in an order that changes from process to process). Tensor offsets are relative to the data,
    so only the header changes; it is padded with spaces to a multiple of 8, as safetensors does."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]
