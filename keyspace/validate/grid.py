"""The validate grid: parsing `--d`, `--k`, `--methods`, `--k-mode`, `--tasks`, and expanding them
into runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keyspace.errors import KeyspaceError
from keyspace.loki import METHODS, get_method
from keyspace.loki.methods import default_methods
from keyspace.options import parse_fraction_list, parse_int
from keyspace.runfolder.store import RANKS
from keyspace.tasks import DEFAULT_TASKS, TASKS


@dataclass
class DChoice:
    """One `--d` value: a label ("32", "auto:0.9") and d per (layer, KV head), long (layers, kv_heads)."""

    label: str
    dims: torch.Tensor
    # auto:τ under the query-aware basis: d per head from the score spectrum's rank@τ (else None)
    score_dims: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for dims in (self.dims, self.score_dims):
            if dims is not None and (dims.dim() != 2 or int(dims.min()) < 1):
                raise ValueError("dims must be (layers, kv_heads) with every d >= 1")

    def dims_for(self, basis: str | None) -> torch.Tensor:
        """d per (layer, KV head) under `basis`: the score ranks for query-aware auto:τ, else `dims`."""
        if basis == "query-aware" and self.score_dims is not None:
            return self.score_dims
        return self.dims

    @property
    def value(self) -> int | str:
        """The JSON value: the integer for a fixed d, the label ("auto:0.9") otherwise."""
        return int(self.label) if self.label.isdigit() else self.label

    @property
    def mean(self) -> float:
        return float(self.dims.float().mean())


@dataclass(frozen=True)
class Keep:
    """One budget of the grid: a fraction `k` of the context (`--k`) or `budget` tokens per step
    (`--budget`, min(budget, context)); exactly one is set."""

    k: float | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if (self.k is None) == (self.budget is None):
            raise ValueError("a Keep is a fraction k or a token budget, exactly one")

    @property
    def label(self) -> str:
        """'0.125' or '2048 tok'."""
        return f"{self.k:g}" if self.budget is None else f"{self.budget} tok"

    def fields(self) -> dict:
        """The JSON fields of a row at this budget: k (the fraction or None) and k_budget."""
        return {"k": self.k, "k_budget": self.budget}


def keeps(ks: list[float], budgets: list[int] = ()) -> list[Keep]:
    """Every fraction, then every token budget."""
    return [Keep(k=k) for k in ks] + [Keep(budget=b) for b in budgets]


@dataclass(frozen=True)
class SweepPoint:
    method: str
    d: DChoice | None
    k: float | None
    k_mode: str | None
    basis: str | None = None  # "key" or "query-aware" for methods that use a basis, else None
    budget: int | None = None  # tokens kept per row instead of the fraction k (then None)

    @property
    def keep(self) -> Keep | None:
        """This point's budget, or None for a method that keeps everything."""
        if self.k is None and self.budget is None:
            return None
        return Keep(self.k, self.budget)

    @property
    def dims(self) -> torch.Tensor | None:
        """d per (layer, KV head) at this point's basis, or None for methods without d."""
        return None if self.d is None else self.d.dims_for(self.basis)


def parse_k(text: str) -> list[float]:
    """`--k`: fractions in (0, 1] (ASCII decimals: `parse_fraction`), sorted, each once."""
    return sorted(set(parse_fraction_list(text, "--k")))


def parse_names(text: str, known: tuple[str, ...], option: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in known:
            raise KeyspaceError(
                f"unknown {option} value {name!r}.", f"Choose from: {', '.join(known)}."
            )
    if not names:
        raise KeyspaceError(f"{option} is empty.", f"Choose from: {', '.join(known)}.")
    return list(dict.fromkeys(names))


def parse_methods(text: str) -> list[str]:
    """`--methods`: registered method names, and `default` for the default grid; each name once."""
    names = parse_names(text, ("default", *METHODS), "--methods")
    return list(
        dict.fromkeys(m for n in names for m in (default_methods() if n == "default" else [n]))
    )


# `--select` -> the method that runs Loki with that coordinate choice
SELECT_METHODS = {"fixed": "loki", "adaptive": "loki-adaptive"}


def with_selects(methods: list[str], selects: tuple[str, ...]) -> list[str]:
    """`loki` in the methods stands for Loki at each `--select`, in place: fixed -> loki, adaptive
    -> loki-adaptive (at the same d, k and basis); each name once."""
    if "loki" not in methods:
        if selects != ("fixed",):
            raise KeyspaceError(
                f"--select {','.join(selects)} chooses Loki's coordinates, and --methods has no loki.",
                "Add loki to --methods (or leave --methods out), or drop --select.",
            )
        return methods
    variants = [SELECT_METHODS[name] for name in selects]
    return list(dict.fromkeys(v for m in methods for v in (variants if m == "loki" else [m])))


def parse_tasks(text: str) -> list[str]:
    """`--tasks`: empty (skip), task names, and `default` for DEFAULT_TASKS; each name once."""
    if not text.strip():
        return []
    names = parse_names(text, ("default", *TASKS), "--tasks")
    return list(dict.fromkeys(t for n in names for t in (DEFAULT_TASKS if n == "default" else [n])))


def ranks_at(ranks: dict | None, kind: str, tau: float, field: str = "rank_at") -> torch.Tensor:
    """rank@τ per (layer, KV head) from the run's ranks document, long (layers, kv_heads).

    field: "rank_at" (the key spectrum) or "score_rank_at" (the score spectrum, query-aware basis).
    """
    hint = f"Run `keyspace analyze <run> --threshold {tau}` to write ranks at τ={tau}."
    if ranks is None:
        raise KeyspaceError(f"--d auto:{tau} needs {RANKS}, and the run has none.", hint)
    table = ranks.get(kind, {}).get(field, {})
    for key, value in table.items():
        if abs(float(key) - tau) < 1e-9:
            return torch.tensor(value, dtype=torch.long)
    what = "ranks" if field == "rank_at" else "score ranks"
    raise KeyspaceError(
        f"{RANKS} has no {kind} {what} at τ={tau} (it has {', '.join(table) or 'none'}).", hint
    )


def parse_d(
    text: str | None, head_dim: int, shape: tuple[int, int], ranks: dict | None, kind: str
) -> list[DChoice]:
    """`--d` ("32", "16,32", "auto:0.9", or None for head_dim/2) into DChoices."""
    choices = []
    for part in (text or str(head_dim // 2)).split(","):
        part = part.strip()
        if part.startswith("auto:"):
            try:
                tau = float(part[5:])
            except ValueError:
                raise KeyspaceError(
                    f"--d {part!r}: τ is not a number.", "Write it like auto:0.9."
                ) from None
            choices.append(DChoice(part, ranks_at(ranks, kind, tau).clamp(min=1)))
            continue
        d = parse_int(part, "--d", 1, head_dim, words="auto:τ")
        choices.append(DChoice(str(d), torch.full(shape, d, dtype=torch.long)))
    return choices


def sweep_points(
    methods: list[str],
    ds: list[DChoice],
    ks: list[float],
    k_modes: list[str],
    bases: tuple[str, ...] = ("key",),
    budgets: list[int] = (),
) -> list[SweepPoint]:
    """Every distinct run: a method that ignores d (or k, or the basis) is run once, not once per
    d (or k and budget, or basis). Token budgets come after the fractions, each at every k-mode
    (a budget keeps the same tokens in both)."""
    points = []
    for name in methods:
        spec = get_method(name)
        for basis in bases if spec.uses_basis else [None]:
            for d in ds if spec.uses_d else [None]:
                for keep in keeps(ks, budgets) if spec.uses_k else [Keep(k=1.0)]:
                    k = keep.k if spec.uses_k else None
                    for mode in k_modes if spec.uses_k else [None]:
                        points.append(SweepPoint(name, d, k, mode, basis, keep.budget))
    return points
