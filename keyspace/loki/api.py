"""`Loki`, the one way into Loki decoding for any supported transformers model.

    loki = Loki.from_run("runs/smollm2", d=32, k=0.125)
    with loki.attach(model):
        out = model.generate(ids, max_new_tokens=64)       # sampling, batches: generate's own args
    out = loki.generate(model, ids, max_new_tokens=64)     # greedy; CUDA graphs on a GPU

A `Loki` holds the basis and the budget, never a model: `attach` gives each `generate` call a
fresh `LokiCache`; `generate` runs the static cache and the CUDA-graph `DecodeLoop` on CUDA and
the same tokens through `LokiCache` on the CPU; `cache` and `static_cache` build caches for the
studies (validate, tasks, bench).

`select="adaptive"` scores each step on r (= d) coordinates chosen from the query, the r largest
Σ_group |q~_j|·σ_j among the first d_max (`keyspace.loki.adaptive_cache`), instead of the first d:

    loki = Loki.from_run("runs/smollm2", d=16, k=0.125, select="adaptive")
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError
from keyspace.loki.adaptive_cache import AdaptiveLokiCache, StaticAdaptiveLokiCache
from keyspace.loki.cache import LokiCache
from keyspace.loki.core import Budget
from keyspace.loki.decode import batch_greedy, cache_kwargs, loki_decoding
from keyspace.loki.from_run import (
    BASES,
    KINDS,
    SELECTS,
    check_choice,
    dims_tensor,
    key_scales,
    open_calibration,
    run_dims,
    transforms,
)
from keyspace.loki.graphs import DecodeLoop, DecodeLoopSettings, bucket_end
from keyspace.loki.static_cache import StaticLokiCache
from keyspace.models.arch import head_geometry
from keyspace.models.placement import input_device

DEFAULT_K = 0.125


@dataclass(frozen=True, eq=False)
class Loki:
    """Loki's decode settings for one model.

    basis:       (layers, kv_heads, D, D) key transform A, rows as directions (k~ = A k)
    dims:        (layers, kv_heads) long, d per head; a layer's cache splits at its largest d
    k:           fraction of the context each decode step attends, in (0, 1] ...
    budget:      ... or tokens each step attends (exactly one of k and budget)
    group_select: under GQA, one token set per KV head (summed group scores)
    query_basis: (layers, kv_heads, D, D) query transform B (q~ = B q), or None for B = A
    select:      "fixed" (score on the first d coordinates, the paper) or "adaptive" (on the r = d
                 coordinates of the largest Σ_group |q~_j|·σ_j among the first d_max, per step)
    d_max:       coordinates the adaptive choice picks from (None: D); at least every d
    key_scale:   (layers, kv_heads, D) σ per basis coordinate, or None (σ = 1); read by "adaptive"
    """

    basis: torch.Tensor
    dims: torch.Tensor
    k: float | None = DEFAULT_K
    budget: int | None = None
    group_select: bool = False
    query_basis: torch.Tensor | None = None
    select: str = "fixed"
    d_max: int | None = None
    key_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        fix = "Build it with Loki.from_run(run, ...) or Loki.from_tensors(basis, d, ...)."
        shape = tuple(self.basis.shape)
        if self.basis.dim() != 4 or shape[-1] != shape[-2]:
            raise KeyspaceError(f"basis must be (layers, kv_heads, D, D), got {shape}.", fix)
        if self.query_basis is not None and tuple(self.query_basis.shape) != shape:
            raise KeyspaceError(
                f"query_basis {tuple(self.query_basis.shape)} must have the basis' shape {shape}.",
                "Pass the key and query transforms of one calibration.",
            )
        if (
            tuple(self.dims.shape) != shape[:2]
            or int(self.dims.min()) < 1
            or self.largest_d > shape[-1]
        ):
            raise KeyspaceError(
                f"d must be in [1, {shape[-1]}] per (layer, KV head) {shape[:2]}.",
                f"Pass an int d between 1 and {shape[-1]}, or one per layer or per (layer, KV head).",
            )
        try:
            Budget(self.k, self.budget)
        except ValueError as err:
            raise KeyspaceError(
                f"{err}.", "Pass k=0.125 (a fraction of the context) or budget=2048 (tokens)."
            ) from None
        self._check_adaptive(shape)

    def _check_adaptive(self, shape: tuple[int, ...]) -> None:
        check_choice("select", self.select, SELECTS)
        d_max = shape[-1] if self.d_max is None else self.d_max
        if (
            isinstance(d_max, bool)
            or not isinstance(d_max, int)
            or not (self.largest_d <= d_max <= shape[-1])
        ):
            raise KeyspaceError(
                f"d_max must be an int in [{self.largest_d}, {shape[-1]}] (the largest d to D),"
                f" got {self.d_max!r}.",
                "Leave d_max out (all D coordinates) or pass one at least as large as d.",
            )
        object.__setattr__(self, "d_max", d_max)
        scale = self.key_scale
        if scale is not None and (
            tuple(scale.shape) != shape[:3] or not bool(torch.isfinite(scale).all())
            or bool((scale < 0).any())
        ):  # fmt: skip
            raise KeyspaceError(
                f"key_scale must be finite and >= 0, of shape {shape[:3]} (layers, kv_heads, D),"
                f" got {tuple(scale.shape)}.",
                "Pass the sqrt of the calibration's eigenvalues, or None (σ = 1).",
            )

    def __repr__(self) -> str:
        layers, kv_heads, dim, _ = self.basis.shape
        low, high = int(self.dims.min()), self.largest_d
        budget = f"k={self.k:g}" if self.budget is None else f"budget={self.budget}"
        kind = "query-aware" if self.query_basis is not None else "orthonormal"
        return (
            f"Loki({layers} layers x {kv_heads} KV heads, D={dim}, {kind} basis,"
            f" d={low if low == high else f'{low}..{high}'}, {budget},"
            f" group_select={self.group_select}"
            + (f", select=adaptive, d_max={self.d_max})" if self.select == "adaptive" else ")")
        )

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_tensors(
        cls,
        basis: torch.Tensor,
        d: int | list[int] | torch.Tensor,
        k: float | None = None,
        query_basis: torch.Tensor | None = None,
        group_select: bool = False,
        budget: int | None = None,
        select: str = "fixed",
        d_max: int | None = None,
        key_scale: torch.Tensor | None = None,
    ) -> Loki:
        """From your own basis (layers, kv_heads, D, D); d an int, one per layer, or one per
        (layer, KV head). k defaults to 0.125 unless a token `budget` is given. select, d_max and
        key_scale (layers, kv_heads, D): as the fields."""
        if basis.dim() != 4:
            raise KeyspaceError(
                f"basis must be (layers, kv_heads, D, D), got {tuple(basis.shape)}.",
                "Stack one (D, D) transform per (layer, KV head), rows as directions.",
            )
        dims = dims_tensor(d, tuple(basis.shape[:2]))
        k = DEFAULT_K if k is None and budget is None else k
        return cls(
            basis, dims, k, budget, bool(group_select), query_basis, select, d_max, key_scale
        )

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        d: int | str = 32,
        k: float | None = None,
        basis: str = "key",
        kind: str = "post",
        group_select: bool = False,
        budget: int | None = None,
        select: str = "fixed",
        d_max: int | None = None,
    ) -> Loki:
        """From the verified calibration of an analyzed run folder.

        d: an int, or "auto:τ" (per head, the rank at explained variance τ from the run's ranks; under
        the query-aware basis, of the score spectrum). basis: "key" (the paper's PCA of the keys)
        or "query-aware" (needs a run collected with queries). kind: the "post"- or "pre"-RoPE
        calibration. k defaults to 0.125 unless a token `budget` is given. select="adaptive"
        carries σ, the sqrt of the basis' eigenvalues (of the score spectrum for query-aware)."""
        check_choice("basis", basis, BASES)
        check_choice("kind", kind, KINDS)
        check_choice("select", select, SELECTS)
        path, ranks, calibration = open_calibration(run, kind)
        key_transform, query_transform = transforms(calibration, kind, basis, path)
        shape = tuple(key_transform.shape[:2])
        dims = dims_tensor(run_dims(d, ranks, kind, basis, path), shape)
        k = DEFAULT_K if k is None and budget is None else k
        scale = key_scales(calibration, kind, (basis,)).get(basis) if select == "adaptive" else None
        return cls(
            key_transform, dims, k, budget, bool(group_select), query_transform, select, d_max,
            scale,
        )  # fmt: skip

    # --- the paths ------------------------------------------------------------------------------

    @property
    def largest_d(self) -> int:
        return int(self.dims.max())

    @property
    def layer_dims(self) -> list[int]:
        """d per layer: the largest d among the layer's KV heads (one split width per layer)."""
        return self.dims.max(dim=1).values.tolist()

    def check_model(self, model: torch.nn.Module) -> None:
        """The basis must fit the model: (layers, kv_heads, head_dim, head_dim)."""
        _, kv_heads, head_dim = head_geometry(model.config)
        expected = (model.config.num_hidden_layers, kv_heads, head_dim, head_dim)
        if tuple(self.basis.shape) != expected:
            raise KeyspaceError(
                f"the Loki basis {tuple(self.basis.shape)} does not fit this model {expected}"
                " (layers, kv_heads, head_dim, head_dim).",
                "Use the calibration of a run collected from this model.",
            )

    def _adaptive_args(self) -> dict:
        return (
            {"d_max": self.d_max, "key_scale": self.key_scale} if self.select == "adaptive" else {}
        )

    def cache(self, model: torch.nn.Module | None = None) -> LokiCache:
        """A fresh dynamic `LokiCache` (an `AdaptiveLokiCache` under select="adaptive"), checked
        against `model` when given."""
        if model is not None:
            self.check_model(model)
        kind = AdaptiveLokiCache if self.select == "adaptive" else LokiCache
        return kind(
            self.basis,
            self.layer_dims,
            self.k,
            self.group_select,
            self.query_basis,
            self.budget,
            **self._adaptive_args(),
        )

    def static_cache(self, model: torch.nn.Module | None, capacity: int) -> StaticLokiCache:
        """A fresh `StaticLokiCache` (a `StaticAdaptiveLokiCache` under select="adaptive") of
        `capacity` tokens per layer, for `DecodeLoop`."""
        if model is not None:
            self.check_model(model)
        kind = StaticAdaptiveLokiCache if self.select == "adaptive" else StaticLokiCache
        return kind(
            self.basis,
            self.layer_dims,
            self.k,
            capacity,
            self.group_select,
            self.query_basis,
            self.budget,
            **self._adaptive_args(),
        )

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Inside the block, `model.generate(...)` decodes with Loki: each call gets a fresh
        `LokiCache` and the Loki attention, for that call only. On exit (also on error) the model's
        own `generate` is back and nothing of Loki is left on it.

        transformers has no public hook that creates a custom `Cache` per call, so the block shadows
        `model.generate` with an instance attribute that adds the cache and calls the original."""
        self.check_model(model)
        own = model.__dict__.get("generate")
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            return self._generate_attached(model, original, args, kwargs)

        model.generate = generate
        try:
            yield model
        finally:
            if own is None:
                del model.generate
            else:
                model.generate = own

    def _generate_attached(self, model, original, args, kwargs):
        """`original(*args, **kwargs)` with a fresh LokiCache and the Loki attention."""
        if any(kwargs.get(name) is not None for name in ("past_key_values", "cache")):
            raise KeyspaceError(
                "inside `loki.attach(model)` the cache is Loki's; generate got one too.",
                "Drop past_key_values/cache from the call, or decode outside the attach block.",
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise KeyspaceError(
                "Loki decodes unpadded batches only; this attention_mask pads some prompts.",
                "Batch prompts of one length per call (or generate them one at a time).",
            )
        cache = self.cache()
        name = next(iter(cache_kwargs(model, cache)))  # "cache" or "past_key_values"
        with loki_decoding(model, cache):
            return original(*args, **{**kwargs, name: cache})

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        settings=None,
    ) -> torch.Tensor:
        """Greedy decoding of equal-length prompts input_ids (B, P): (B, P + max_new_tokens) on
        input_ids' device, as `model.generate` returns (but never stopping early at EOS).

        On CUDA the static cache and the CUDA-graph `DecodeLoop` (`settings`: its
        DecodeLoopSettings), whose budget is rounded up to the end of each length bucket
        (`keyspace.loki.graphs`; bucket=1 keeps the exact rule); elsewhere `LokiCache`."""
        self.check_model(model)
        if input_ids.dim() != 2 or input_ids.shape[1] < 1 or max_new_tokens < 1:
            raise KeyspaceError(
                f"need input_ids (batch, tokens) and max_new_tokens >= 1, got"
                f" {tuple(input_ids.shape)} and {max_new_tokens}.",
                "Pass tokenizer(prompts, return_tensors='pt').input_ids of unpadded prompts.",
            )
        device = input_device(model)
        prompt = input_ids.to(device)
        spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
        if device.type == "cuda" and not spread:  # a dispatched model decodes layer by layer
            new = self._graph_loop(model, prompt, max_new_tokens, settings)
        else:
            cache = self.cache()
            with loki_decoding(model, cache):
                new = batch_greedy(model, cache, prompt, max_new_tokens)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def _graph_loop(self, model, prompt, new_tokens: int, settings) -> torch.Tensor:
        settings = settings or DecodeLoopSettings()
        capacity = bucket_end(prompt.shape[1] + new_tokens, settings.bucket, 1 << 62)
        with DecodeLoop(model, self.static_cache(None, capacity), settings) as loop:
            return loop.generate(prompt, new_tokens)
