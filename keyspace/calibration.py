"""The calibration file: per (kind, layer, KV head) PCA basis that the Loki stage consumes.

Written by the analyzer into the run folder (`keyspace.store.calibration_path`). Tensors, for kind in {pre, post}:
  `{kind}.mean`        (layers, kv_heads, head_dim)            float32
  `{kind}.components`  (layers, kv_heads, head_dim, head_dim)  float32, row i = i-th direction,
                                                                sorted by descending eigenvalue
  `{kind}.eigenvalues` (layers, kv_heads, head_dim)            float32, descending
Metadata (str -> str): model_identity, centered ("true"/"false"), tokens, keyspace_version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace.store import atomic_path


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

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for kind in self.components:
            tensors[f"{kind}.mean"] = self.mean[kind].float().contiguous()
            tensors[f"{kind}.components"] = self.components[kind].float().contiguous()
            tensors[f"{kind}.eigenvalues"] = self.eigenvalues[kind].float().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in self.metadata.items()})


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by `Calibration.save`."""
    from safetensors import safe_open

    mean, components, eigenvalues = {}, {}, {}
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        for name in f.keys():
            kind, what = name.split(".", 1)
            target = {"mean": mean, "components": components, "eigenvalues": eigenvalues}[what]
            target[kind] = f.get_tensor(name)
    return Calibration(mean, components, eigenvalues, metadata)
