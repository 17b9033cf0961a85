"""Whole-model decode speed on one CUDA GPU: dense against Loki through the same model and loop.

Both paths run `keyspace.loki.graphs.DecodeLoop` (static cache, eager chunked prefill, each decode
step one CUDA-graph replay); only the cache and its attention differ. transformers' own `generate`
(DynamicCache, SDPA, a Python loop) is the everyday second baseline.

Per row: prefill seconds; the median decode step (CUDA events around each replay) and tokens/s;
the step's byte floor (weights once, all but the embedding table, of which B rows are read; plus
the KV read: dense 2·S·D per KV head, Loki S·d + k_top·(2D − d) per index set) at the measured
DRAM read rate, and the % of it reached; the split of the step into attention and the rest (the
same step captured with attention skipped); the speedups over the dense loop and `generate`; the
peak device memory since the row's cache was allocated (its prefill included; Loki rows sharing a
prefill report the peak since that prefill).

Before anything is allocated, each (batch, seq) is checked against the card's free memory
(`keyspace.bench.shapes.memory_need`): a shape that cannot fit stops the sweep with one error
naming the memory it needs. Each row's cache is freed before the next is allocated.

Speed does not depend on the weights: the `--config` models are random-init at real shapes, and
the Loki bases random orthonormal matrices unless a calibration's are passed.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from keyspace.bench.e2e_memory import capacity_of, check_memory, free_memory, peak_gb
from keyspace.bench.e2e_table import format_row, markdown_table, save_result
from keyspace.bench.kernels import memory_bandwidth_gbps
from keyspace.bench.shapes import (
    CONFIG_NAMES,
    DTYPES,
    Shape,
    build_model,
    floor_ms,
    kv_bytes,
    weight_bytes,
)
from keyspace.loki import Loki
from keyspace.loki.graphs import DecodeLoop, DecodeLoopSettings, bucket_end, decode_budget
from keyspace.loki.prefill import chunk_length
from keyspace.loki.static_cache import StaticKVCache

__all__ = ["E2EConfig", "run_e2e", "decode_speed", "check_memory"]
__all__ += ["format_row", "markdown_table", "save_result"]  # from e2e_table


@dataclass(frozen=True)
class E2EConfig:
    """One end-to-end sweep: every (batch, seq), dense and each (d, k) and (d, budget) point, on
    one model."""

    config: str | None = "llama3-8b"  # random-init at a real shape (CONFIG_NAMES) ...
    model: str | None = (
        None  # ... or a real model (alias, folder), loaded by keyspace.models.loading
    )
    layers: int | None = None  # keep the first N decoder layers
    batches: tuple[int, ...] = (16,)
    seqs: tuple[int, ...] = (4096, 16384, 32768)
    steps: int = 64  # timed decode steps per row
    points: tuple[tuple[int, float], ...] = ((32, 0.125),)
    budgets: tuple[tuple[int, int], ...] = ()  # (d, tokens kept per step): min(tokens, context)
    group_select: bool = True
    dtype: str = "float16"
    generate_steps: int = 4  # transformers' generate baseline; 0 skips it
    split: bool = True  # also time the step with attention skipped
    check: bool = True  # graph == eager tokens, Loki at k=1 against dense, before timing
    loop: DecodeLoopSettings = field(default_factory=DecodeLoopSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.config is None) == (self.model is None):
            raise ValueError("give exactly one of config (a random-init shape) or model")
        if self.config is not None and self.config not in CONFIG_NAMES:
            raise ValueError(f"config must be one of {CONFIG_NAMES}, got {self.config!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if min(self.batches) < 1 or min(self.seqs) < 2 or self.steps < 1:
            raise ValueError("batch and steps must be positive and seq at least 2")
        if self.layers is not None and self.layers < 1:
            raise ValueError("layers must be positive")
        for d, k in self.points:
            if d < 1 or not 0 < k <= 1:
                raise ValueError(f"bad (d, k) point ({d}, {k}): d >= 1 and k in (0, 1]")
        for d, tokens in self.budgets:
            if d < 1 or tokens < 1:
                raise ValueError(f"bad (d, budget) point ({d}, {tokens}): d >= 1 and budget >= 1")
        if not self.points and not self.budgets:
            raise ValueError("give at least one (d, k) point or (d, budget) point")

    def loki_points(self) -> list[tuple[int, float | None, int | None]]:
        """(d, k, budget) of every Loki row: the fractions, then the token budgets (one of k and
        budget is None)."""
        return [(d, k, None) for d, k in self.points] + [(d, None, b) for d, b in self.budgets]


# --- timing ------------------------------------------------------------------------------------


def random_bases(shape: Shape, device, seed: int = 0) -> torch.Tensor:
    """(layers, kv_heads, D, D) random orthonormal bases, rows as directions."""
    gen = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randn(
        shape.layers, shape.kv_heads, shape.head_dim, shape.head_dim, generator=gen, device=device
    )
    return torch.linalg.qr(raw)[0].transpose(-1, -2).contiguous()


def time_steps(loop: DecodeLoop, steps: int) -> list[float]:
    """ms of each of `steps` decode steps, by CUDA events around each replay (graphs captured first)."""
    loop.prepare(steps)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        loop.step()
        events[i + 1].record()
    events[-1].synchronize()
    return [events[i].elapsed_time(events[i + 1]) for i in range(steps)]


def prefill(model, cache, prompt: torch.Tensor, settings: DecodeLoopSettings) -> tuple:
    """Prefill `cache` with `prompt` through the loop: (first token (B,), seconds)."""
    with DecodeLoop(model, cache, settings) as loop:
        torch.cuda.synchronize()
        start = time.perf_counter()
        first = loop.prefill(prompt)
        torch.cuda.synchronize()
    return first, time.perf_counter() - start


def run_path(model, cache, first: torch.Tensor, seq: int, cfg: E2EConfig) -> dict:
    """Time `cfg.steps` decode steps from a cache holding `seq` prompt tokens and the prefill's
    token `first`, then the same steps with attention skipped; rewind the cache to `seq`."""
    result = {}
    with DecodeLoop(model, cache, cfg.loop) as loop:
        loop.resume(first, seq)
        result["times_ms"] = time_steps(loop, cfg.steps)
    if cfg.split:
        with DecodeLoop(model, cache, cfg.loop, attend=False) as loop:
            loop.resume(first, seq)
            result["rest_ms"] = statistics.median(time_steps(loop, cfg.steps))
    cache.set_length(seq)
    return result


def generate_baseline(model, prompt: torch.Tensor, steps: int, prefill_chunk: int) -> dict | None:
    """transformers' default greedy `generate` (DynamicCache, the model's attention; its own chunked
    prefill): prefill seconds, the median ms of its decode steps, each timed between two
    logits-processor calls, and its peak memory. None if it runs out of device memory."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    clock = Clock()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            model.generate(
                prompt,
                max_new_tokens=steps + 1,
                min_new_tokens=steps + 1,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
                prefill_chunk_size=prefill_chunk,
            )
    except torch.OutOfMemoryError:
        free_memory()
        return None
    gaps = [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:], strict=False)]
    result = {"prefill_s": clock.times[0] - start, "step_ms": statistics.median(gaps)}
    result["peak_gb"] = peak_gb()
    free_memory()
    return result


def _row(batch, seq, method, path, weights, kv, gbps, **point) -> dict:
    """One table row from a timed path; `point` is the Loki (d, k, k_budget, k_top) when method is
    loki (k None for a token budget, k_budget None for a fraction)."""
    step = statistics.median(path["times_ms"])
    row = {"batch": batch, "seq": seq, "method": method, "d": None, "k": None, "k_budget": None}
    row["k_top"] = None
    row |= point | {
        "prefill_s": path["prefill_s"],
        "step_ms": step,
        "tokens_per_s": batch * 1e3 / step,
        "weights_gb": weights / 1e9,
        "kv_gb": kv / 1e9,
        "floor_ms": floor_ms(weights + kv, gbps),
    }
    row["floor_pct"] = 100 * row["floor_ms"] / step
    if "rest_ms" in path:
        row["rest_ms"], row["attention_ms"] = path["rest_ms"], step - path["rest_ms"]
        row["rest_floor_ms"], row["attention_floor_ms"] = (
            floor_ms(weights, gbps),
            floor_ms(kv, gbps),
        )
    return row


def run_point(
    model,
    cfg: E2EConfig,
    batch: int,
    seq: int,
    gbps: float,
    log: Callable[[str], None] = print,
    variants: dict[str, DecodeLoopSettings] | None = None,
) -> list[dict]:
    """Rows of one (batch, seq): dense, then each (d, k), each under every loop variant (default:
    cfg.loop alone) on one prefilled cache per kind; speedups against dense and `generate`."""
    variants = variants or {"": cfg.loop}
    shape, device = Shape.of(model), next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed + seq)
    prompt = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=gen)
    capacity = capacity_of(seq, cfg)
    weights, rows = weight_bytes(model, batch), []
    baseline = None
    if cfg.generate_steps:
        log(f"B={batch} S={seq}: transformers generate")
        chunk = chunk_length(batch, cfg.loop.prefill_chunk, cfg.loop.prefill_tokens)
        baseline = generate_baseline(model, prompt, cfg.generate_steps, chunk)

    def time_cache(cache, method, kv, first=None, prefill_s=None, **point):
        if first is None:
            first, prefill_s = prefill(model, cache, prompt, cfg.loop)
        for name, loop in variants.items():
            log(f"B={batch} S={seq}: {method} {point or ''} {name}")
            try:
                path = run_path(model, cache, first, seq, dataclasses.replace(cfg, loop=loop))
            except Exception as error:  # one broken variant must not cost the sweep
                log(f"  variant {name!r} failed: {type(error).__name__}: {error}")
                cache.set_length(seq)
                continue
            path["prefill_s"] = prefill_s
            row = _row(batch, seq, method, path, weights, kv, gbps, **point)
            rows.append({**row, "variant": name, "peak_gb": peak_gb()})
        return first, prefill_s

    torch.cuda.reset_peak_memory_stats()
    time_cache(StaticKVCache(shape.layers, capacity), "dense", kv_bytes(shape, batch, seq))
    free_memory()
    bases = random_bases(shape, device, cfg.seed)
    points = cfg.loki_points()
    for d in sorted({d for d, _, _ in points}):
        cache, first, prefill_s = None, None, None
        for _, k, budget in [p for p in points if p[0] == d]:
            if cache is None:
                torch.cuda.reset_peak_memory_stats()
                loki = Loki.from_tensors(
                    bases, d, k=k, group_select=cfg.group_select, budget=budget
                )
                cache = loki.static_cache(model, capacity)
            cache.set_budget(k=k, budget=budget)
            # tokens a step at `seq` attends: ceil(k·seq), or min(budget, seq) (the cache's rule)
            k_top = decode_budget(k, seq) if budget is None else cache.tokens_kept(seq)
            kv = kv_bytes(shape, batch, seq, d, k_top, cfg.group_select)
            first, prefill_s = time_cache(
                cache, "loki", kv, first, prefill_s, d=d, k=k, k_budget=budget, k_top=k_top
            )
        del cache
        free_memory()
    dense = {row["variant"]: row["step_ms"] for row in rows if row["method"] == "dense"}
    for row in rows:
        if row["variant"] in dense:
            row["speedup_vs_dense"] = dense[row["variant"]] / row["step_ms"]
        if baseline is not None:
            row["generate_step_ms"] = baseline["step_ms"]
            row["generate_prefill_s"] = baseline["prefill_s"]
            row["generate_peak_gb"] = baseline["peak_gb"]
            row["speedup_vs_generate"] = baseline["step_ms"] / row["step_ms"]
    return rows


# --- correctness, on the GPU -------------------------------------------------------------------


def _loop_tokens(model, cache, prompt, steps, settings, graphs: bool) -> torch.Tensor:
    with DecodeLoop(model, cache, settings, graphs=graphs) as loop:
        return loop.generate(prompt, steps)


def check_name(d: int | None, k: float | None, budget: int | None) -> str:
    """The name of one graph-against-eager check: dense (d None), or a Loki point."""
    if d is None:
        return "dense"
    return f"loki d={d} " + (f"k={k:g}" if budget is None else f"budget={budget}")


def check_loop(model, cfg: E2EConfig, batch: int, steps: int = 12) -> list[dict]:
    """The graph loop's tokens against the same loop run eagerly (must be equal), and agreement
    shares of Loki at k=1 against dense and of the dense loop against transformers' generate. The
    prompt ends a few tokens before a bucket end, so the steps cross into the next bucket."""
    shape, device = Shape.of(model), next(model.parameters()).device
    seq = max(2, cfg.loop.bucket - steps // 2)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, seq), device=device, generator=gen)
    capacity, bases = seq + steps + 1, random_bases(shape, device, cfg.seed)
    checks = []

    def make(d=None, k=None, budget=None):
        if d is None:
            return StaticKVCache(shape.layers, capacity)
        loki = Loki.from_tensors(bases, d, k=k, group_select=cfg.group_select, budget=budget)
        return loki.static_cache(model, capacity)

    def agree(a, b) -> float:
        return float((a == b).double().mean())

    dense, first_d = None, cfg.loki_points()[0][0]
    for d, k, budget in [(None, None, None), *cfg.loki_points(), (first_d, 1.0, None)]:
        graph = _loop_tokens(model, make(d, k, budget), prompt, steps, cfg.loop, graphs=True)
        eager = _loop_tokens(model, make(d, k, budget), prompt, steps, cfg.loop, graphs=False)
        name = check_name(d, k, budget)
        checks.append({"check": f"{name}: graph == eager", "value": agree(graph, eager)})
        if d is None:
            dense = graph
        elif k == 1.0:
            checks.append({"check": f"{name}: tokens equal to dense", "value": agree(graph, dense)})
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    checks.append(
        {"check": "dense: tokens equal to generate", "value": agree(dense, hf[:, seq:].cpu())}
    )
    return checks


# --- the sweep ---------------------------------------------------------------------------------


def run_e2e(
    cfg: E2EConfig,
    log: Callable[[str], None] = print,
    variants: dict[str, DecodeLoopSettings] | None = None,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """The whole sweep on this machine's GPU: {"meta": ..., "checks": [...], "rows": [...]}.
    `variants` (name -> loop settings) are each timed on the same prefilled caches; `save` gets
    the result so far after each (batch, seq). Stops before allocating (KeyspaceError) if a
    (batch, seq) cannot fit the card's free memory."""
    if cfg.config is not None:
        check_memory(cfg, torch.cuda.mem_get_info()[0])
    model = build_model(cfg)
    if cfg.config is None:
        check_memory(cfg, torch.cuda.mem_get_info()[0], model.config, weights_loaded=True)
    bandwidth = memory_bandwidth_gbps()
    log(f"DRAM read {bandwidth['read_gbps']:.0f} GB/s, copy {bandwidth['copy_gbps']:.0f} GB/s")
    checks = check_loop(model, cfg, min(cfg.batches)) if cfg.check else []
    free_memory()
    for check in checks:
        log(f"check {check['check']}: {check['value']:.3f}")
    result = {"meta": _meta(cfg, model, bandwidth), "checks": checks, "rows": []}
    for batch in cfg.batches:
        for seq in cfg.seqs:
            point = run_point(model, cfg, batch, seq, bandwidth["read_gbps"], log, variants)
            for row in point:
                log(format_row(row))
            result["rows"] += point
            free_memory()
            if save is not None:
                save(result)
    return result


def _meta(cfg: E2EConfig, model, bandwidth: dict) -> dict:
    import transformers

    shape = Shape.of(model)
    return {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "config": cfg.config,
        "model": cfg.model,
        "shape": dataclasses.asdict(shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loop": dataclasses.asdict(cfg.loop),
        "group_select": cfg.group_select,
        "steps": cfg.steps,
        "bandwidth_gbps": bandwidth,
    }


def decode_speed(
    model,
    batch: int,
    seq: int,
    steps: int = 32,
    d: int = 32,
    k: float | None = 0.125,
    basis: torch.Tensor | None = None,
    group_select: bool = True,
    settings: DecodeLoopSettings | None = None,
    budget: int | None = None,
) -> dict:
    """Decode tokens/s of `model` (on CUDA) with a dense static cache and with Loki at (d, k), or
    at (d, budget) tokens per step when `budget` is given (k is then ignored), both through the
    graph loop from a random prompt of `seq` tokens. `basis` (layers, kv_heads, D, D) defaults to
    random orthonormal bases. Returns {"dense": {...}, "loki": {...}, "speedup": x}."""
    k = None if budget is not None else k
    shape, device = Shape.of(model), next(model.parameters()).device
    cfg = E2EConfig(steps=steps, split=False, loop=settings or DecodeLoopSettings())
    prompt = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    basis = random_bases(shape, device) if basis is None else basis
    capacity, out = bucket_end(seq + steps + 1, cfg.loop.bucket, 1 << 62), {}
    for name in ("dense", "loki"):
        if name == "dense":
            cache = StaticKVCache(shape.layers, capacity)
        else:
            loki = Loki.from_tensors(basis, d, k=k, group_select=group_select, budget=budget)
            cache = loki.static_cache(model, capacity)
        first, prefill_s = prefill(model, cache, prompt, cfg.loop)
        step = statistics.median(run_path(model, cache, first, seq, cfg)["times_ms"])
        out[name] = {"step_ms": step, "tokens_per_s": batch * 1e3 / step, "prefill_s": prefill_s}
        del cache
        free_memory()
    out["speedup"] = out["dense"]["step_ms"] / out["loki"]["step_ms"]
    return out
