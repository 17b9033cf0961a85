"""The decode-kernel benchmark: Loki against dense SDPA on the same cache, on one CUDA GPU.

`run_sweep` returns plain rows (dicts); `benchmarks/bench_decode.py` and `keyspace bench` print
them. Whole decode steps are timed as CUDA-graph replays, rotating over several input sets so that
no step finds its cache in L2; each stage is also timed alone, and `torch.topk` beside the
selection. Bytes are the algorithmic floor: each input read once, the output written once.

Only the public entry points of `keyspace.kernels` are timed, with `backend="triton"` and the
sweep's `KernelSettings`, so a variant is a `BenchConfig(settings=replace(DEFAULT_SETTINGS, ...))`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from keyspace.errors import KeyspaceError
from keyspace.kernels import (
    DEFAULT_SETTINGS,
    KernelSettings,
    loki_decode,
    lowrank_scores,
    select_topk,
    sparse_attention,
)
from keyspace.models.arch import head_geometry
from keyspace.models.loading import ALIASES, alias_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Relative L2 error allowed against the fp32 oracle (‖out − ref‖ / ‖ref‖).


@dataclass
class BenchConfig:
    """One sweep: every (kv_heads, seq, (d, k fraction)) combination, MHA and GQA."""

    batch: int = 16
    q_heads: int = 32
    kv_heads: Sequence[int] = (32, 8)
    head_dim: int = 128
    seqs: Sequence[int] = (4096, 16384, 32768)
    points: Sequence[tuple[int, float]] = ((32, 1 / 8), (32, 1 / 4), (16, 1 / 8), (64, 1 / 4))
    dtype: str = "float16"
    input_sets: int = 2
    reps: int = 15
    replays: int = 10
    per_head_under_gqa: bool = True  # also time per-query-head selection when Hkv < Hq
    label: str = field(default="")
    settings: KernelSettings = DEFAULT_SETTINGS  # the kernels' launch parameters

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for h in self.kv_heads:
            if h < 1 or self.q_heads % h:
                raise ValueError(f"q_heads={self.q_heads} is not a multiple of kv_heads={h}")
        for d, frac in self.points:
            if not 1 <= d <= self.head_dim:
                raise ValueError(f"d={d} must lie in [1, head_dim={self.head_dim}]")
            if not 0 < frac <= 1:
                raise ValueError(f"k fraction {frac} must lie in (0, 1]")
        if min(self.seqs) < 1 or self.batch < 1 or self.input_sets < 1:
            raise ValueError("batch, seq and input_sets must be positive")


def model_geometry(spec: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a model, from its config alone (no weights read).

    `spec` is an alias (its config is built in, no download), a local folder with config.json,
    or a hub id whose config is cached or reachable."""
    from transformers import AutoConfig

    folder = Path(spec).expanduser()
    hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not folder.exists()
    error = KeyspaceError(
        f"cannot read attention shapes for model {spec!r}.",
        f"Pass an alias ({', '.join(ALIASES)}), a folder with config.json or a hub id, "
        "or give --heads, --kv-heads and --head-dim.",
    )
    if spec in ALIASES:
        config = alias_config(spec)
    elif (folder / "config.json").is_file() or hub_id:
        try:
            config = AutoConfig.from_pretrained(folder if not hub_id else spec)
        except (OSError, ValueError):
            raise error from None
    else:
        raise error
    return head_geometry(getattr(config, "text_config", None) or config)


def default_points(head_dim: int) -> tuple[tuple[int, float], ...]:
    """The default (d, k fraction) points that fit `head_dim` (they assume 128), or d = D/4."""
    points = tuple(p for p in BenchConfig.points if p[0] <= head_dim)
    return points or ((max(1, head_dim // 4), 1 / 8),)


def memory_bandwidth_gbps(nbytes: int = 4 << 30) -> dict:
    """Measured DRAM rates in GB/s: a device-to-device copy (read + write) and a read-only sum.

    Decode reads far more than it writes, so the read rate is the byte floor's rate.
    """
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    copy_ms = _graph_ms([lambda: dst.copy_(src)], reps=10, replays=3)
    read_ms = _graph_ms([lambda: src.sum(dtype=torch.float32)], reps=10, replays=3)
    return {"copy_gbps": 2 * nbytes / copy_ms / 1e6, "read_gbps": nbytes / read_ms / 1e6}


def _graph_ms(fns: Sequence[Callable[[], object]], reps: int, replays: int) -> float:
    """Median ms per call: each callable captured into a CUDA graph, the graphs replayed in turn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # compile and warm up outside capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    for graph in graphs:
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for i in range(replays * len(graphs)):
            graphs[i % len(graphs)].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(graphs)))
    del graphs
    return statistics.median(times)


def _eager_ms(fns: Sequence[Callable[[], object]]) -> float:
    """Median ms of plain launches (Python and launch overhead included), rotating input sets."""
    import triton

    cycle = itertools.cycle(fns)
    return triton.testing.do_bench(lambda: next(cycle)(), warmup=25, rep=100, return_mode="median")


def _sdpa_fn(q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    gqa = q.shape[1] != keys.shape[1]

    def step() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q[:, :, None], keys, v, enable_gqa=gqa)

    return step


def _make_inputs(cfg: BenchConfig, kv_heads: int, seq: int, gen: torch.Generator) -> list[dict]:
    dtype = DTYPES[cfg.dtype]
    sets = []
    for _ in range(cfg.input_sets):
        shape = (cfg.batch, kv_heads, seq, cfg.head_dim)
        sets.append(
            {
                "q": torch.randn(
                    cfg.batch, cfg.q_heads, cfg.head_dim, device="cuda", dtype=dtype, generator=gen
                ),
                "keys": torch.randn(shape, device="cuda", dtype=dtype, generator=gen),
                "v": torch.randn(shape, device="cuda", dtype=dtype, generator=gen),
            }
        )
    return sets


def _time_sdpa(sets: list[dict], cfg: BenchConfig) -> dict:
    from torch.nn.attention import SDPBackend

    out = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        fns = [_sdpa_fn(s["q"], s["keys"], s["v"], backend) for s in sets]
        try:
            out[name] = _graph_ms(fns, cfg.reps, cfg.replays)
        except RuntimeError as err:  # a backend that refuses the shape (e.g. GQA)
            out[name] = float("nan")
            out[f"{name}_error"] = str(err).splitlines()[0][:120]
    times = [t for t in (out["flash"], out["efficient"]) if not math.isnan(t)]
    out["sdpa_ms"] = min(times) if times else float("nan")
    return out


def _time_loki(sets: list[dict], cfg: BenchConfig, d: int, k_top: int, group: bool) -> dict:
    kernel = {"backend": "triton", "settings": cfg.settings}
    steps, scores, idx, low = [], [], [], []
    for s in sets:
        steps.append(
            lambda s=s: loki_decode(
                s["q"], s["k_low"], s["k_rest"], s["v"], k_top, group_select=group, **kernel
            )
        )
        scores.append(lowrank_scores(s["q"], s["k_low"], group, **kernel))
        idx.append(select_topk(scores[-1], k_top, **kernel))
        # The step hands per-head attention the score pass's q_low·k_low: time it the same way.
        per_head = scores[-1].shape[1] == s["q"].shape[1]
        low.append(scores[-1] if cfg.settings.reuse_low_scores and per_head else None)
    stages = list(zip(sets, idx, low, strict=True))
    timed = {
        "scores_ms": [
            lambda s=s: lowrank_scores(s["q"], s["k_low"], group, **kernel) for s in sets
        ],
        "select_ms": [lambda sc=sc: select_topk(sc, k_top, **kernel) for sc in scores],
        "topk_torch_ms": [
            lambda sc=sc: torch.topk(sc, k_top, dim=-1, sorted=False) for sc in scores
        ],
        "attention_ms": [
            lambda s=s, i=i, lo=lo: sparse_attention(
                s["q"], s["k_low"], s["k_rest"], s["v"], i, low_scores=lo, **kernel
            )
            for s, i, lo in stages
        ],
    }
    row = {"loki_ms": _graph_ms(steps, cfg.reps, cfg.replays), "loki_eager_ms": _eager_ms(steps)}
    row.update({name: _graph_ms(fns, cfg.reps, cfg.replays) for name, fns in timed.items()})
    return row


def _floor_bytes(cfg: BenchConfig, kv_heads: int, seq: int, d: int, k_top: int, group: bool):
    es = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    qo = 2 * cfg.batch * cfg.q_heads * cfg.head_dim * es
    dense = 2 * cfg.batch * kv_heads * seq * cfg.head_dim * es + qo
    sets = kv_heads if group else cfg.q_heads
    loki = cfg.batch * kv_heads * seq * d * es + cfg.batch * sets * k_top * 2 * cfg.head_dim * es
    return dense, loki + qo


def run_sweep(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Time SDPA and Loki over the sweep; returns {"meta": ..., "rows": [...]}."""
    import triton

    props = torch.cuda.get_device_properties(0)
    rates = memory_bandwidth_gbps()
    peak = max(rates.values())
    log(f"{props.name}: {props.multi_processor_count} SMs, {rates} (floor rate {peak:.0f} GB/s)")
    meta = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        **rates,
        "floor_gbps": peak,
        "config": dataclasses.asdict(cfg),
    }
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for kv_heads, seq in itertools.product(cfg.kv_heads, cfg.seqs):
        sets = _make_inputs(cfg, kv_heads, seq, gen)
        sdpa = _time_sdpa(sets, cfg)
        log(f"Hkv={kv_heads} S={seq}: sdpa {sdpa['sdpa_ms']:.3f} ms {sdpa}")
        modes = [True] if kv_heads == cfg.q_heads else [True] + [False] * cfg.per_head_under_gqa
        for d in sorted({d for d, _ in cfg.points}):
            for s in sets:
                s["k_low"] = s["keys"][..., :d].contiguous()
                s["k_rest"] = s["keys"][..., d:].contiguous()
            for (pd, frac), group in itertools.product(cfg.points, modes):
                if pd != d:
                    continue
                k_top = max(1, round(frac * seq))
                dense_b, loki_b = _floor_bytes(cfg, kv_heads, seq, d, k_top, group)
                row = {
                    "batch": cfg.batch,
                    "q_heads": cfg.q_heads,
                    "kv_heads": kv_heads,
                    "head_dim": cfg.head_dim,
                    "seq": seq,
                    "d": d,
                    "k_frac": frac,
                    "k_top": k_top,
                    "select": "mha" if kv_heads == cfg.q_heads else ("group" if group else "head"),
                    "dtype": cfg.dtype,
                    **{k: v for k, v in sdpa.items()},
                    **_time_loki(sets, cfg, d, k_top, group),
                    "dense_bytes": dense_b,
                    "loki_bytes": loki_b,
                }
                row["speedup"] = row["sdpa_ms"] / row["loki_ms"]
                row["floor_speedup"] = dense_b / loki_b
                row["loki_gbps"] = loki_b / row["loki_ms"] / 1e6
                row["loki_pct_floor"] = 100 * loki_b / peak / 1e6 / row["loki_ms"]
                row["sdpa_pct_floor"] = 100 * dense_b / peak / 1e6 / row["sdpa_ms"]
                rows.append(row)
                log(format_row(row))
            for s in sets:
                del s["k_low"], s["k_rest"]
        del sets
        torch.cuda.empty_cache()
    return {"meta": meta, "rows": rows}


def save_result(result: dict, folder: Path) -> None:
    """Write a sweep as bench_decode.json (everything) and bench_decode.md (the table)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_decode.json").write_text(json.dumps(result, indent=2, default=str))
    (folder / "bench_decode.md").write_text(markdown_table(result["rows"]) + "\n")


def format_row(row: dict) -> str:
    return (
        f"Hkv={row['kv_heads']:>2} S={row['seq']:>5} d={row['d']:>3} k={row['k_frac']:.3f} "
        f"{row['select']:>5}: sdpa {row['sdpa_ms']:.3f} loki {row['loki_ms']:.3f} ms "
        f"({row['speedup']:.2f}x, floor {row['floor_speedup']:.2f}x, "
        f"{row['loki_pct_floor']:.0f}% of floor) | scores {row['scores_ms']:.3f} "
        f"select {row['select_ms']:.3f} (topk {row['topk_torch_ms']:.3f}) "
        f"attn {row['attention_ms']:.3f} eager {row['loki_eager_ms']:.3f}"
    )


TABLE_COLUMNS = [
    ("Hkv", "kv_heads", "{}"),
    ("S", "seq", "{}"),
    ("d", "d", "{}"),
    ("k", "k_frac", "{:.3f}"),
    ("select", "select", "{}"),
    ("SDPA ms", "sdpa_ms", "{:.3f}"),
    ("Loki ms", "loki_ms", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("floor", "floor_speedup", "{:.2f}x"),
    ("GB/s", "loki_gbps", "{:.0f}"),
    ("% floor", "loki_pct_floor", "{:.0f}%"),
    ("scores", "scores_ms", "{:.3f}"),
    ("select ms", "select_ms", "{:.3f}"),
    ("topk", "topk_torch_ms", "{:.3f}"),
    ("attn", "attention_ms", "{:.3f}"),
    ("eager", "loki_eager_ms", "{:.3f}"),
]


def markdown_table(rows: Sequence[dict]) -> str:
    """The sweep as a markdown table (times in ms, CUDA-graph replays unless 'eager')."""
    head = "| " + " | ".join(name for name, _, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(TABLE_COLUMNS)

    def cell(value, fmt: str) -> str:
        return "–" if isinstance(value, float) and math.isnan(value) else fmt.format(value)

    body = [
        "| " + " | ".join(cell(row[key], fmt) for _, key, fmt in TABLE_COLUMNS) + " |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])
