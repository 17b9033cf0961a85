"""A greedy decode loop at hardware speed: static caches, and one CUDA graph per decode step.

The same loop runs dense attention (`StaticKVCache`) and Loki (`StaticLokiCache`) over the same
model, in gpt-fast's recipe:
- prefill is dense and eager, in chunks of `prefill_chunk` prompt tokens (at most
  `prefill_tokens` batch rows × tokens), its attention reading the cache in place with a bounded
  workspace (`keyspace.loki.prefill`);
- q/k/v and gate/up run as one GEMM each while the loop is entered (`keyspace.loki.fused`);
- each decode step is the whole model step (embedding, every layer, the head, a greedy argmax)
  replayed from a captured `torch.cuda.CUDAGraph`: no Python and no host sync per token;
- the graph attends over a fixed slice of the static cache, [0, L) with L the end of the step's
  length bucket; rows past the valid length (`seqlens`, on the device) are masked out (dense) or
  never selected (Loki). One graph serves every length of a bucket.

Loki's budget is a Python int per graph, so it is set per bucket and rounded up:
    k_top = min(ceil(k · L), L)      L = bucket end, ceil(valid length / bucket) · bucket
It never keeps fewer tokens than ceil(k · S) at the true length S ≤ L, and at most ceil(k · bucket)
more; the kernels clamp it to each row's valid length. A token budget keeps min(budget, L), the
same rule (`keyspace.loki.core.Budget`). Without a bucket (`view_length` None, e.g.
inside `generate()`), L is the exact length and the budget is the dynamic `LokiCache`'s.

    with DecodeLoop(model, cache) as loop:
        tokens = loop.generate(prompt, new_tokens=64)   # (B, 64), greedy
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from keyspace.loki.core import Budget
from keyspace.loki.decode import cache_kwargs
from keyspace.loki.fused import fused_projections
from keyspace.loki.prefill import chunk_length, prefill_attention
from keyspace.loki.registry import Handler, use_attention
from keyspace.loki.static_cache import StaticKVCache, StaticLokiCache
from keyspace.models.arch import compiled_slots

if TYPE_CHECKING:
    from keyspace.kernels import KernelSettings

COMPILE_MODES = ("auto", "none", "layers")
QUERY_ROTATIONS = ("einsum", "bmm")


@dataclass(frozen=True)
class DecodeLoopSettings:
    """How the loop runs; the defaults are the values measured best on an H200 (docs/notes/e2e-decode.md).

    bucket: tokens per length bucket; one graph (and one Loki budget) per bucket end
    prefill_chunk: prompt tokens per eager prefill forward ...
    prefill_tokens: ... cut so that batch × chunk stays under this (bounds the activations)
    prefill_workspace: bytes of K and V repeated to the query heads per prefill attention call
    compile: "layers" runs each decoder layer, all but its attention and cache write, through
        torch.compile before capture (fewer, fused kernels); "none" keeps transformers' eager
        modules (see `CompiledModules`); "auto" is "layers" on CUDA and "none" elsewhere
    compile_backend: torch.compile's backend for the compiled mode (tests use "eager")
    warmup_runs: eager runs of a step before its capture (compilation, autotuning, workspaces)
    kernels: the Loki kernels' `KernelSettings` (None: their tuned defaults)
    fuse_projections: run q/k/v and gate/up as one GEMM each inside the loop (`fused_projections`)
    query_rotation: how a Loki decode step rotates its query: "einsum" (`TransformedKeys.rotated_query`)
        or "bmm" (one batched matmul over the heads, written contiguous in the query's dtype:
        fewer launches, the same float32 products)

    Dense decode is SDPA with enable_gqa and a mask past the valid length (cuDNN on the H100 and
    H200); the candidates it beat, and a "blocks" compile mode, are in docs/notes/e2e-decode.md
    and benchmarks/bench_e2e.py.
    """

    bucket: int = 256
    prefill_chunk: int = 8192
    compile: str = "auto"
    compile_backend: str = "inductor"
    warmup_runs: int = 2
    kernels: KernelSettings | None = None
    fuse_projections: bool = True
    prefill_tokens: int = 16384
    prefill_workspace: int = 1 << 30
    query_rotation: str = "bmm"  # H100, B=16, 16k: 0.13 ms a step less (e2e-decode.md)

    def __post_init__(self) -> None:
        if self.bucket < 1 or self.prefill_chunk < 2 or self.warmup_runs < 1:
            raise ValueError("bucket and warmup_runs must be positive, prefill_chunk at least 2")
        if self.prefill_tokens < 2 or self.prefill_workspace < 1:
            raise ValueError("prefill_tokens must be at least 2 and prefill_workspace positive")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}")
        if self.query_rotation not in QUERY_ROTATIONS:
            raise ValueError(f"query_rotation must be one of {QUERY_ROTATIONS}")


def bucket_end(length: int, bucket: int, capacity: int) -> int:
    """The end of the length bucket holding `length` valid tokens: a multiple of `bucket`, at most capacity."""
    return min(-(-length // bucket) * bucket, capacity)


def decode_budget(k: float, end: int) -> int:
    """Loki's tokens per index set over a view of `end` tokens: ceil(k · end), in [1, end]."""
    return Budget(k).kept(end)


# --- attention over a static cache -------------------------------------------------------------


def _view_end(cache, layer) -> int:
    """How far this step attends: the bucket end the loop set, or the exact valid length."""
    end = layer.length if cache.view_length is None else min(cache.view_length, layer.capacity)
    if end < layer.length:
        raise ValueError(f"view length {end} is shorter than the {layer.length} valid tokens")
    return end


def _valid_mask(layer, end: int) -> torch.Tensor:
    """(B, 1, 1, end) bool: True at the valid positions of each row."""
    return (layer._steps[:end] < layer.seqlens[:, None])[:, None, None, :]


def dense_decode(query, layer, end: int, scale: float) -> torch.Tensor:
    """Dense attention of one query row (B, Hq, 1, D) over the view [0, end) of a StaticKVLayer,
    rows past each row's valid length masked -> (B, 1, Hq, D). SDPA with enable_gqa reads K and V
    once per KV head; with the mask it takes cuDNN's decode kernel on the H100 and H200."""
    out = F.scaled_dot_product_attention(
        query,
        layer.keys[:, :, :end],
        layer.values[:, :, :end],
        attn_mask=_valid_mask(layer, end),
        scale=scale,
        enable_gqa=query.shape[1] != layer.keys.shape[1],
    )
    return out.transpose(1, 2)


def static_attention(
    cache: StaticKVCache | StaticLokiCache,
    settings: DecodeLoopSettings | None = None,
    attend: bool = True,
) -> Handler:
    """The attention of a model whose cache is `cache`: dense prefill; at q_len == 1 dense SDPA over
    the view (StaticKVCache) or the Loki kernels (StaticLokiCache). With attend=False a decode step
    skips attention (returns the query), to time the rest of the step."""
    settings = settings or DecodeLoopSettings()
    loki = isinstance(cache, StaticLokiCache)
    rotations: dict[int, torch.Tensor] = {}  # layer -> (Hq, D, D) float32 B^T, for "bmm"

    def decode_query(layer, query):
        """q~ (B, Hq, D) of one query row (B, Hq, 1, D), contiguous, in the query's dtype."""
        if settings.query_rotation == "einsum":
            return layer.rotated_query(query)[:, :, 0]
        if layer not in rotations:  # filled by the eager warm-up runs, before any capture
            groups = query.shape[1] // layer.query_basis.shape[0]
            per_head = layer.query_basis.float().repeat_interleave(groups, dim=0)
            rotations[layer] = per_head.transpose(1, 2).contiguous()  # [Hq, D, D]
        q = query[:, :, 0].transpose(0, 1).float()  # [Hq, B, D]
        out = torch.bmm(q, rotations[layer]).transpose(0, 1)  # [B, Hq, D]
        return out.to(query.dtype, memory_format=torch.contiguous_format)

    def handler(module, query, key, value, scale):
        layer = cache.layers[module.layer_idx]
        if query.shape[-2] > 1:
            values = layer.values[:, :, : layer.length]
            if loki:
                query = layer.rotated_query(query)
                parts = layer.key_parts()  # the store's views, any layout
            else:
                parts = (layer.keys[:, :, : layer.length],)
            return prefill_attention(query, parts, values, scale, settings.prefill_workspace)
        if not attend:
            return query.transpose(1, 2)
        end = _view_end(cache, layer)
        if not loki:
            return dense_decode(query, layer, end, scale)
        out = layer.decode_step(
            decode_query(layer, query),  # [B, Hq, D]
            end,
            cache.tokens_kept(end),
            scale,
            cache.group_select,
            settings.kernels,
        )
        return out[:, None].to(query.dtype)  # [B, 1, Hq, D]

    return handler


# --- the loop ----------------------------------------------------------------------------------


class CompiledModules:
    """torch.compile'd wrappers of a model's decoder layers and final norm, swapped in for decode
    steps only.

    Each whole decoder layer (its projections, RoPE, residuals, norms and MLP) is compiled; the
    cache write and the attention stay eager, as `torch.compiler.disable`d calls. Where the layers
    and the norm live is the architecture's row in `keyspace.models.arch`. The wrappers share
    compiled graphs: layers differ only in weights and in `layer_idx`, which is kept unspecialized.
    `active()` swaps them in (prefill chunks of other lengths would recompile) and puts the
    originals back on exit, also on error.
    """

    def __init__(self, model: torch.nn.Module, backend: str = "inductor"):
        self._slots = [
            (parent, name, child, torch.compile(child, backend=backend, dynamic=None))
            for parent, name, child in compiled_slots(model)
        ]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        import torch._dynamo

        try:
            for parent, name, _, compiled in self._slots:
                setattr(parent, name, compiled)
            with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
                yield
        finally:
            for parent, name, original, _ in self._slots:
                setattr(parent, name, original)


class DecodeLoop:
    """Greedy decoding over a static cache: eager chunked prefill, then one step per token, each a
    replay of the captured whole-model step (graphs=True, CUDA) or the same step run eagerly.

    The model's attention is routed through `static_attention(cache)` inside the `with` block.
    Generated tokens stay on the device until `tokens()`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: StaticKVCache | StaticLokiCache,
        settings: DecodeLoopSettings | None = None,
        graphs: bool | None = None,
        attend: bool = True,
    ):
        self.model, self.cache = model, cache
        self.settings = settings or DecodeLoopSettings()
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self._handler = static_attention(cache, self.settings, attend)
        self._captured: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._stack = contextlib.ExitStack()
        mode = self.settings.compile
        if mode == "auto":
            mode = "layers" if self.device.type == "cuda" else "none"
        self._compiled = (
            None if mode == "none" else CompiledModules(model, self.settings.compile_backend)
        )
        self._token = (
            None  # (B, 1) the token fed next; (1, 1) its position; (B, capacity + 1) output
        )
        self.length = self.start = 0  # valid cache tokens; the prompt length

    def __enter__(self) -> DecodeLoop:
        try:
            if self.settings.fuse_projections:
                self._stack.enter_context(fused_projections(self.model))
            self._stack.enter_context(use_attention(self.model, self._handler))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._captured.clear()
        self._stack.close()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of the last position: (B, vocab)."""
        kwargs = cache_kwargs(self.model, self.cache)
        out = self.model(input_ids=ids, position_ids=positions, logits_to_keep=1, **kwargs)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run prompt (B, P) into the empty cache, eagerly, in chunks; return the first token (B,)."""
        self.cache.set_length(0)
        self.cache.view_length = None
        prompt = prompt.to(self.device)
        settings, length = self.settings, prompt.shape[1]
        chunk = chunk_length(prompt.shape[0], settings.prefill_chunk, settings.prefill_tokens)
        starts = list(range(0, length, chunk))
        if len(starts) > 1 and length - starts[-1] < 2:
            starts.pop()  # a one-token chunk would take the decode path: fold it into the last one
        for i, begin in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else length
            positions = torch.arange(begin, end, device=self.device)[None]
            logits = self._forward(prompt[:, begin:end], positions)
        first = logits.argmax(-1)
        self.resume(first, length)
        return first

    def resume(self, token: torch.Tensor, length: int) -> None:
        """Continue from `token` (B,) at position `length`, the cache holding `length` valid tokens."""
        batch = token.shape[0]
        if self._token is None:
            self._token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            self._position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self._out = torch.zeros(
                batch, self.cache.capacity + 1, dtype=torch.long, device=self.device
            )
        elif self._token.shape[0] != batch:
            raise ValueError(f"this loop decodes batches of {self._token.shape[0]}, got {batch}")
        self._token.copy_(token.view(batch, 1))
        self._position.fill_(length)
        self._out[:, length] = token.view(batch)
        self.cache.set_length(length)
        self.length = self.start = length

    def _decoding(self) -> contextlib.AbstractContextManager:
        """The modules of a decode step: the compiled blocks if the settings ask for them."""
        return contextlib.nullcontext() if self._compiled is None else self._compiled.active()

    def _body(self) -> None:
        """One greedy step on the static buffers: feed the token, write the argmax back."""
        next_token = self._forward(self._token, self._position).argmax(-1, keepdim=True)  # [B, 1]
        self._token.copy_(next_token)
        self._position.add_(1)
        self._out.index_copy_(1, self._position[0], next_token)

    def _state(self) -> list[torch.Tensor]:
        return [self._token, self._position] + [layer.seqlens for layer in self.cache.layers]

    def _graph(self, end: int) -> torch.cuda.CUDAGraph:
        """The captured step for the bucket ending at `end`; warm-up runs are undone afterwards."""
        if end in self._captured:
            return self._captured[end]
        self.cache.view_length = end
        saved = [t.clone() for t in self._state()]

        def restore() -> None:
            for t, s in zip(self._state(), saved, strict=True):
                t.copy_(s)
            self.cache.set_length(self.length)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with self._decoding():
            with torch.cuda.stream(side):
                for _ in range(self.settings.warmup_runs):
                    self._body()
                    restore()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                self._body()
        restore()
        self._captured[end] = graph
        return graph

    def end_of(self, steps_done: int = 0) -> int:
        """The bucket end of the step after `steps_done` more steps."""
        return bucket_end(self.length + steps_done + 1, self.settings.bucket, self.cache.capacity)

    @torch.no_grad()
    def prepare(self, steps: int) -> None:
        """Capture now every graph that the next `steps` steps replay (keeps capture out of timings)."""
        if self.graphs:
            for end in sorted({self.end_of(s) for s in range(steps)}):
                self._graph(end)

    @torch.no_grad()
    def step(self) -> None:
        """Decode one token for every row."""
        if self.length + 1 > self.cache.capacity:
            raise ValueError(f"the cache is full ({self.cache.capacity} tokens)")
        end = self.end_of()
        if self.graphs:
            self._graph(end).replay()
            self.length += 1
            for layer in self.cache.layers:  # the graph advanced the device lengths
                layer.length = self.length
        else:
            self.cache.view_length = end
            with self._decoding():
                self._body()
            self.length += 1

    def tokens(self) -> torch.Tensor:
        """The tokens generated since the prompt: (B, steps + 1), on the CPU."""
        return self._out[:, self.start : self.length + 1].cpu()

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy: prefill `prompt` (B, P), then decode; returns (B, new_tokens) as HF's generate does."""
        self.prefill(prompt)
        self.prepare(new_tokens - 1)
        for _ in range(new_tokens - 1):
            self.step()
        return self.tokens()
