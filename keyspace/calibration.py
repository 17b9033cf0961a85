"""The calibration file: per (kind, layer, KV head) PCA basis that the Loki stage consumes.

Written by the analyzer into the run folder (`keyspace.store.calibration_path`). Tensors, for kind in {pre, post}:
  `{kind}.mean`        (layers, kv_heads, head_dim)            float32
  `{kind}.components`  (layers, kv_heads, head_dim, head_dim)  float32, row i = i-th direction,
                                                                sorted by descending eigenvalue
  `{kind}.eigenvalues` (layers, kv_heads, head_dim)            float32, descending
Metadata (str -> str): model_identity, centered ("true"/"false"), tokens, keyspace_version.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError
from keyspace.store import parse_tensors, read_file, save_tensors

PARTS = ("mean", "components", "eigenvalues")


@dataclass
class Calibration:
    """PCA bases per kind; each entry maps kind -> tensor with the shapes in the module docstring."""

    mean: dict[str, torch.Tensor]
    components: dict[str, torch.Tensor]
    eigenvalues: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

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

    @property
    def model_identity(self) -> str:
        return self.metadata.get("model_identity", "")

    def save(self, path: str | Path) -> str:
        """Write the file atomically; returns its sha256."""
        tensors = {}
        for kind in self.components:
            tensors[f"{kind}.mean"] = self.mean[kind].float()
            tensors[f"{kind}.components"] = self.components[kind].float()
            tensors[f"{kind}.eigenvalues"] = self.eigenvalues[kind].float()
        return save_tensors(path, tensors, metadata={k: str(v) for k, v in self.metadata.items()})


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes: the header is a little-endian u64 length + JSON."""
    (length,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + length]).get("__metadata__") or {})


def calibration_from_bytes(data: bytes, path: Path, hint: str = "") -> Calibration:
    """Parse a calibration file already read (and verified); a malformed one names the file."""
    tensors = parse_tensors(data, path, hint)
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    try:
        for name, tensor in tensors.items():
            kind, part = name.split(".", 1)
            parts[part][kind] = tensor
        return Calibration(**parts, metadata=safetensors_metadata(data))
    except (KeyError, ValueError) as err:
        raise KeyspaceError(f"{path} is not a calibration file ({err}).", hint) from None


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by `Calibration.save`, unverified (validate reads it
    through `keyspace.analyze.read_calibration`, which checks its hash first)."""
    return calibration_from_bytes(read_file(Path(path), ""), Path(path))
