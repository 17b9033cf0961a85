"""A greedy decode loop at hardware speed: static caches, and one CUDA graph per decode step.

The same loop runs dense attention (`StaticKVCache`) and Loki (`StaticLokiCache`) over the same
model, in gpt-fast's recipe:
- prefill is dense and eager, in chunks of `prefill_chunk` prompt tokens;
- each decode step is the whole model step (embedding, every layer, the head, a greedy argmax)
  replayed from a captured `torch.cuda.CUDAGraph`: no Python and no host sync per token;
- the graph attends over a fixed slice of the static cache, [0, L) with L the end of the step's
  length bucket; rows past the valid length (`seqlens`, on the device) are masked out (dense) or
  never selected (Loki). One graph serves every length of a bucket.

Loki's budget is a Python int per graph, so it is set per bucket and rounded up:
    k_top = min(ceil(k · L), L)      L = bucket end, ceil(valid length / bucket) · bucket
It never keeps fewer tokens than ceil(k · S) at the true length S ≤ L, and at most ceil(k · bucket)
more; the kernels clamp it to each row's valid length. Without a bucket (`view_length` None, e.g.
inside `generate()`), L is the exact length and the budget is the dynamic `LokiCache`'s.

    with DecodeLoop(model, cache) as loop:
        tokens = loop.generate(prompt, new_tokens=64)   # (B, 64), greedy
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from keyspace.loki.decode import cache_kwargs
from keyspace.loki.masked import causal_mask, fraction_of
from keyspace.loki.methods.common import rotate
from keyspace.loki.registry import Handler, use_attention
from keyspace.loki.static_cache import StaticKVCache, StaticLokiCache

if TYPE_CHECKING:
    from keyspace.kernels import KernelSettings

DENSE_DECODE_KINDS = ("sdpa_fold", "sdpa_gqa", "varlen")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = ("auto", "none", "blocks", "layers")


@dataclass(frozen=True)
class DecodeLoopSettings:
    """How the loop runs; the defaults are the values measured best on an H200 (docs/notes/e2e-decode.md).

    bucket: tokens per length bucket; one graph (and one Loki budget) per bucket end
    prefill_chunk: prompt tokens per eager prefill forward
    dense_attention: the dense decode attention over the static cache, one of DENSE_DECODE_KINDS:
        "sdpa_fold" SDPA with each KV head's query group on the query-length axis and a mask past
            the valid length (K and V read once per KV head);
        "sdpa_gqa" SDPA with enable_gqa and the same mask;
        "varlen" flash attention over exactly the valid length (`varlen_attn` with `seqused_k`).
    sdpa_backend: pins the SDPA kernel of the "sdpa_*" kinds (one of SDPA_BACKENDS; "auto" lets
        torch choose)
    compile: "layers" runs each decoder layer, all but its attention and cache write, through
        torch.compile before capture (fewer, fused kernels); "blocks" only its norms and MLP;
        "none" keeps transformers' eager modules (see `CompiledModules`); "auto" is "layers" on
        CUDA and "none" elsewhere
    compile_backend: torch.compile's backend for the compiled modes (tests use "eager")
    warmup_runs: eager runs of a step before its capture (compilation, autotuning, workspaces)
    kernels: the Loki kernels' `KernelSettings` (None: their tuned defaults)
    """

    bucket: int = 256
    prefill_chunk: int = 8192
    dense_attention: str = "sdpa_gqa"
    sdpa_backend: str = "auto"
    compile: str = "auto"
    compile_backend: str = "inductor"
    warmup_runs: int = 2
    kernels: KernelSettings | None = None

    def __post_init__(self) -> None:
        if self.bucket < 1 or self.prefill_chunk < 2 or self.warmup_runs < 1:
            raise ValueError("bucket and warmup_runs must be positive, prefill_chunk at least 2")
        if self.dense_attention not in DENSE_DECODE_KINDS:
            raise ValueError(f"dense_attention must be one of {DENSE_DECODE_KINDS}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {SDPA_BACKENDS}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}")


def bucket_end(length: int, bucket: int, capacity: int) -> int:
    """The end of the length bucket holding `length` valid tokens: a multiple of `bucket`, at most capacity."""
    return min(-(-length // bucket) * bucket, capacity)


def decode_budget(k: float, end: int) -> int:
    """Loki's tokens per index set over a view of `end` tokens: ceil(k · end), in [1, end]."""
    return min(int(fraction_of(k, end)), end)


# --- attention over a static cache -------------------------------------------------------------


def _view_end(cache, layer) -> int:
    """How far this step attends: the bucket end the loop set, or the exact valid length."""
    end = layer.length if cache.view_length is None else min(cache.view_length, layer.capacity)
    if end < layer.length:
        raise ValueError(f"view length {end} is shorter than the {layer.length} valid tokens")
    return end


def _prefill_attention(query, keys, values, scale) -> torch.Tensor:
    """Exact causal attention, the queries being the last T of the S keys: (B, Hq, T, D) x (B, Hkv,
    S, D) -> (B, T, Hq, D).

    From an empty cache SDPA's causal kernels read K and V in place. A later chunk repeats K and V
    to the query heads and passes an explicit mask, which the memory-efficient kernel takes (a
    lower-right causal bias with GQA can fall back to materializing the whole score matrix).
    """
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    groups = query.shape[1] // keys.shape[1]
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scale, enable_gqa=groups > 1
        )
    else:
        out = F.scaled_dot_product_attention(
            query,
            keys.repeat_interleave(groups, dim=1),
            values.repeat_interleave(groups, dim=1),
            attn_mask=causal_mask(q_len, kv_len, query.device),
            scale=scale,
        )
    return out.transpose(1, 2)


def _valid_mask(layer, end: int) -> torch.Tensor:
    """(B, 1, 1, end) bool: True at the valid positions of each row."""
    return (layer._steps[:end] < layer.seqlens[:, None])[:, None, None, :]


def _dense_sdpa_fold(query, layer, end, scale) -> torch.Tensor:
    batch, q_heads, _, dim = query.shape
    kv_heads = layer.keys.shape[1]
    grouped = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)  # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(
        grouped,
        layer.keys[:, :, :end],
        layer.values[:, :, :end],
        attn_mask=_valid_mask(layer, end),
        scale=scale,
    )
    return out.reshape(batch, 1, q_heads, dim)


def _dense_sdpa_gqa(query, layer, end, scale) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        query,
        layer.keys[:, :, :end],
        layer.values[:, :, :end],
        attn_mask=_valid_mask(layer, end),
        scale=scale,
        enable_gqa=query.shape[1] != layer.keys.shape[1],
    )
    return out.transpose(1, 2)


def _dense_varlen(query, layer, end, scale) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    batch, q_heads, _, dim = query.shape
    capacity, kv_heads = layer.key_store.shape[1], layer.key_store.shape[2]
    if not hasattr(layer, "_varlen_offsets"):  # built on the first (eager) call, reused in graphs
        rows = torch.arange(batch + 1, device=query.device, dtype=torch.int32)
        layer._varlen_offsets = (rows, rows * capacity)
    starts_q, starts_k = layer._varlen_offsets
    # torch 2.11's varlen_attn takes GQA without a flag; later versions ask for enable_gqa.
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    out = varlen_attn(
        query.reshape(batch, q_heads, dim),
        layer.key_store.view(batch * capacity, kv_heads, dim),
        layer.value_store.view(batch * capacity, kv_heads, dim),
        starts_q,
        starts_k,
        1,
        end,
        scale=scale,
        seqused_k=layer.seqlens.to(torch.int32),
        **gqa,
    )
    return out.reshape(batch, 1, q_heads, dim)


DENSE_DECODE = {"sdpa_fold": _dense_sdpa_fold, "sdpa_gqa": _dense_sdpa_gqa, "varlen": _dense_varlen}


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """A context that pins SDPA to the backend `name` ("auto": torch's own choice)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([backends[name]])


def _rotated_query(layer, query: torch.Tensor) -> torch.Tensor:
    """q~ = B q: query (B, Hq, T, D) through its KV head's query transform; the per-query-head copy is kept."""
    if layer.per_query_head is None or layer.per_query_head.shape[0] != query.shape[1]:
        groups = query.shape[1] // layer.query_basis.shape[0]
        layer.per_query_head = layer.query_basis.repeat_interleave(groups, dim=0)  # [Hq, D, D]
    return rotate(query, layer.per_query_head)


def _loki_decode_step(cache, layer, query, end, scale, kernel_settings) -> torch.Tensor:
    from keyspace.kernels import loki_decode

    extra = {} if kernel_settings is None else {"settings": kernel_settings}
    out = loki_decode(
        _rotated_query(layer, query)[:, :, 0],  # [B, Hq, D]
        layer.k_low[:, :, :end],
        layer.k_rest[:, :, :end],
        layer.values[:, :, :end],
        decode_budget(cache.k, end),
        scale=scale,
        group_select=cache.group_select,
        seqlens=layer.seqlens,
        **extra,
    )
    return out[:, None].to(query.dtype)  # [B, 1, Hq, D]


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
    dense_decode = DENSE_DECODE[settings.dense_attention]

    def handler(module, query, key, value, scale):
        layer = cache.layers[module.layer_idx]
        if query.shape[-2] > 1:
            values = layer.values[:, :, : layer.length]
            if loki:
                query, keys = _rotated_query(layer, query), layer.rotated_keys()
            else:
                keys = layer.keys[:, :, : layer.length]
            return _prefill_attention(query, keys, values, scale)
        if not attend:
            return query.transpose(1, 2)
        end = _view_end(cache, layer)
        if loki:
            return _loki_decode_step(cache, layer, query, end, scale, settings.kernels)
        with sdpa_backend(settings.sdpa_backend):
            return dense_decode(query, layer, end, scale)

    return handler


# --- the loop ----------------------------------------------------------------------------------

COMPILED_CHILDREN = ("input_layernorm", "post_attention_layernorm", "mlp")


class CompiledModules:
    """torch.compile'd wrappers of a model's modules, swapped in for decode steps only.

    mode "blocks": each decoder layer's norms and MLP; "layers": each whole decoder layer (its
    projections, RoPE, residuals, norms and MLP; the cache write and the attention stay eager, as
    `torch.compiler.disable`d calls). The final norm in both. The wrappers share compiled graphs:
    layers differ only in weights and in `layer_idx`, which is kept unspecialized. `active()` swaps
    them in (prefill chunks of other lengths would recompile) and puts the originals back on exit,
    also on error.
    """

    def __init__(self, model: torch.nn.Module, mode: str, backend: str = "inductor"):
        layers = model.model.layers
        if mode == "blocks":
            slots = [(layer, name) for layer in layers for name in COMPILED_CHILDREN]
        else:
            slots = [(layers, str(i)) for i in range(len(layers))]
        slots.append((model.model, "norm"))
        dynamic = False if mode == "blocks" else None  # None: layer_idx becomes a symbol
        self._slots = [
            (parent, name, child, torch.compile(child, backend=backend, dynamic=dynamic))
            for parent, name in slots
            if (child := getattr(parent, name, None)) is not None
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
            None if mode == "none" else CompiledModules(model, mode, self.settings.compile_backend)
        )
        self._token = (
            None  # (B, 1) the token fed next; (1, 1) its position; (B, capacity + 1) output
        )
        self.length = self.start = 0  # valid cache tokens; the prompt length

    def __enter__(self) -> DecodeLoop:
        self._stack.enter_context(use_attention(self.model, self._handler))
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
        chunk, length = self.settings.prefill_chunk, prompt.shape[1]
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
