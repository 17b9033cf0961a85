"""The method registry: every selection method is one `Method`, registered once, looked up by name.

A new method is one file in this package that builds a `Method` and calls `register_method`, plus
its test; validate, tasks, the reports and the tests read everything else from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from keyspace.errors import KeyspaceError
from keyspace.loki.methods.common import LayerInputs

# How tasks decode a method one token at a time (keyspace.tasks.decoders):
#   "dense":         the dense DynamicCache (no selection)
#   "cache":         real sparse decoding through LokiCache and the kernels
#   "masked-row":    dense prefill, then each step one masked-mode row against the dense cache
#   "heavy-hitters": as masked-row, but keeping H2O's running attention sums between steps
# Every masked path is checked against re-running the whole sequence per step (the reference).
DECODE_PATHS = ("dense", "cache", "masked-row", "heavy-hitters")

# (head_dim, d, k) -> share of a dense decode step's KV bytes (2·S·D per head) that a method reads;
# d is None for a method without d, k is 1.0 for one without a budget.
Cost = Callable[[int, float | None, float], float]


@dataclass(frozen=True)
class Style:
    """How the reports draw a method: a matplotlib colour and marker, and its legend label."""

    color: str
    marker: str
    label: str


@dataclass(frozen=True)
class Method:
    """A selection method: its function, what it consumes, its bytes, its decode path, its style.

    select:      (LayerInputs) -> logits (batch, q_heads, q_len, kv_len), -inf outside the kept set
    uses_d / uses_k / uses_basis: it reads `dims`, the budget, a calibrated basis
    uses_group:  it honours group_select (one token set per KV head under GQA)
    uses_key_scale: it reads `key_scale` (sigma per basis coordinate)
    top_k:       it keeps exactly budget[i] tokens of row i (False: it keeps the whole context)
    in_default_grid: `keyspace validate` runs it without --methods
    """

    name: str
    select: Callable[[LayerInputs], torch.Tensor]
    cost: Cost
    decode: str
    style: Style
    uses_d: bool = False
    uses_k: bool = False
    uses_basis: bool = False
    uses_group: bool = False
    uses_key_scale: bool = False
    top_k: bool = True
    in_default_grid: bool = True

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or "," in self.name:
            raise ValueError(f"a method name must be non-empty, with no comma: {self.name!r}")
        if self.decode not in DECODE_PATHS:
            raise ValueError(
                f"{self.name}: decode must be one of {DECODE_PATHS}, got {self.decode!r}"
            )
        if self.top_k and not self.uses_k:
            raise ValueError(f"{self.name}: a top-k method uses k")

    def kv_bytes_fraction(
        self, head_dim: int, d: float | None = None, k: float | None = None
    ) -> float:
        """Share of a dense decode step's KV bytes (2·S·D) this method reads at (d, k)."""
        return self.cost(head_dim, d, 1.0 if k is None else k)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` to METHODS; a second method of the same name is refused."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered; pick another name")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called `name`; an unknown name is a KeyspaceError listing them."""
    if name not in METHODS:
        raise KeyspaceError(f"unknown method {name!r}.", f"Choose from: {', '.join(METHODS)}.")
    return METHODS[name]


def default_methods() -> tuple[str, ...]:
    """The methods `keyspace validate` runs when --methods is not given, in registration order."""
    return tuple(name for name, m in METHODS.items() if m.in_default_grid)


def loki_cost(head_dim: int, d: float | None, k: float) -> float:
    """S·d low-rank values, then keys and values of k·S tokens: (d + 2·k·D) / (2·D)."""
    return (float(d or 0.0) + 2 * k * head_dim) / (2 * head_dim)
