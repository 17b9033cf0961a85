"""The running moments of a run: exact float64 sums per kind, mergeable across ranks and resumes.

One safetensors file holds every kind: keys as `{kind}.count/.sum/.outer` for kind in KINDS, and,
for runs collected with queries, `query.{kind}.*`. Reading checks the file's shape against the
run's and that every value is finite (a NaN or Inf would make every later number NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError
from keyspace.runfolder.files import parse_tensors, save_tensors

KINDS = ("pre", "post")
MOMENTS = "moments.safetensors"


def query_kind(kind: str) -> str:
    """The moments-file kind holding the queries of `kind` (tensors `query.{kind}.count`, ...)."""
    return f"query.{kind}"


QUERY_KINDS = tuple(query_kind(kind) for kind in KINDS)


@dataclass
class Moments:
    """Running first and second moments of keys, exact in float64 and mergeable by summation.

    Queries use the same record per KV head, their group's G query heads pooled: each token adds
    G vectors, so a query count is tokens × G.

    count: (layers,)                              vectors seen per layer (tokens for keys)
    sum:   (layers, kv_heads, head_dim)           sum of x
    outer: (layers, kv_heads, head_dim, head_dim) sum of x xᵀ
    """

    count: torch.Tensor
    sum: torch.Tensor
    outer: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("count", "sum", "outer"):
            if getattr(self, name).dtype != torch.float64:
                raise ValueError(f"Moments.{name} must be float64")
        if self.sum.dim() != 3:
            raise ValueError("Moments.sum must be (layers, kv_heads, head_dim)")
        layers, heads, dim = self.sum.shape
        if self.count.shape != (layers,) or self.outer.shape != (layers, heads, dim, dim):
            raise ValueError("Moments shapes disagree")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        return tuple(self.sum.shape)

    @classmethod
    def zeros(cls, layers: int, kv_heads: int, head_dim: int) -> Moments:
        f64 = torch.float64
        return cls(
            torch.zeros(layers, dtype=f64),
            torch.zeros(layers, kv_heads, head_dim, dtype=f64),
            torch.zeros(layers, kv_heads, head_dim, head_dim, dtype=f64),
        )

    def add_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Accumulate keys of shape (tokens, kv_heads, head_dim) into `layer`."""
        x = keys.detach().to("cpu", torch.float64)
        self.count[layer] += x.shape[0]
        self.sum[layer] += x.sum(dim=0)
        self.outer[layer] += torch.einsum("thi,thj->hij", x, x)

    def merge(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.sum + other.sum, self.outer + other.outer)

    def to_tensors(self, kind: str) -> dict[str, torch.Tensor]:
        return {f"{kind}.count": self.count, f"{kind}.sum": self.sum, f"{kind}.outer": self.outer}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kind: str) -> Moments:
        return cls(tensors[f"{kind}.count"], tensors[f"{kind}.sum"], tensors[f"{kind}.outer"])

    def first_nonfinite(self) -> str | None:
        """Where the first NaN or Inf is ("count of layer 2", "sum of layer 0, head 1"), or None."""
        bad = ~torch.isfinite(self.count)
        if bad.any():
            return f"count of layer {int(bad.nonzero()[0, 0])}"
        for name, tensor in (("sum", self.sum), ("outer", self.outer)):
            bad = ~torch.isfinite(tensor.flatten(2)).all(dim=-1)  # (layers, kv_heads)
            if bad.any():
                layer, head = (int(i) for i in bad.nonzero()[0])
                return f"{name} of layer {layer}, KV head {head}"
        return None


def save_moments(path: str | Path, moments: dict[str, Moments]) -> str:
    """Write the moments of every kind; returns the file's sha256."""
    tensors: dict[str, torch.Tensor] = {}
    for kind, m in moments.items():
        tensors.update(m.to_tensors(kind))
    return save_tensors(path, tensors)


def moments_from_bytes(
    data: bytes, path: Path, hint: str, shape: tuple[int, int, int] | None = None
) -> dict[str, Moments]:
    """Parse a moments file already read (and verified); check it holds both kinds of `shape`,
    every value finite.

    Query moments (QUERY_KINDS) are included when the file has them (runs collected with
    `--capture keys,queries`); older runs have none.
    """
    tensors = parse_tensors(data, path, hint)
    present = [q for q in QUERY_KINDS if any(name.startswith(f"{q}.") for name in tensors)]
    try:
        moments = {kind: Moments.from_tensors(tensors, kind) for kind in (*KINDS, *present)}
    except (KeyError, ValueError) as err:
        raise KeyspaceError(
            f"{path} does not hold the moments of both kinds ({err}).", hint
        ) from None
    if shape is not None and any(m.shape != tuple(shape) for m in moments.values()):
        raise KeyspaceError(f"{path} holds moments of another shape than the run's {shape}.", hint)
    for kind, m in moments.items():
        where = m.first_nonfinite()
        if where is not None:
            raise KeyspaceError(f"{path} holds a NaN or Inf in the {kind} moments: {where}.", hint)
    return moments
