"""The decode-kernel benchmark: Loki (fixed d, and adaptive at r = d) against dense SDPA on the
same cache, on one CUDA GPU.

`run_sweep` returns plain rows (dicts), one per (method, shape, point); `benchmarks/bench_decode.py`
and `keyspace bench` print them. The dense baseline is the fastest SDPA backend that accepts the
shape (`keyspace.bench.dense`); a speedup above the row's byte-floor ratio is flagged
`baseline_below_floor`, since no method can beat a baseline that reads at the floor by more.
Whole decode steps are timed as CUDA-graph replays, rotating over several input sets so that
no step finds its cache in L2; each stage is also timed alone, and `torch.topk` beside the
selection. Bytes are the algorithmic floor: each input read once, the output written once.

Only the public entry points of `keyspace.kernels` are timed, with `backend="triton"` and the
sweep's `KernelSettings`, so a variant is a `BenchConfig(settings=replace(DEFAULT_SETTINGS, ...))`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace.bench.dense import time_dense
from keyspace.bench.timing import eager_ms, graph_ms, memory_bandwidth_gbps
from keyspace.errors import KeyspaceError
from keyspace.kernels import (
    DEFAULT_SETTINGS,
    KernelSettings,
    adaptive_coords,
    adaptive_decode,
    adaptive_fused_scores,
    adaptive_scores,
    loki_decode,
    lowrank_scores,
    select_topk,
    sparse_attention,
)
from keyspace.models.arch import head_geometry
from keyspace.models.loading import ALIASES, alias_config
from keyspace.runfolder.files import dumps_json

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BELOW_FLOOR = "baseline below its floor"


@dataclass
class BenchConfig:
    """One sweep: every (kv_heads, seq, point) combination, MHA and GQA. A point is (d, k
    fraction) in `points` or (d, tokens kept) in `budgets`; with `adaptive`, each fixed-d row has
    an adaptive row beside it at r = d and the same k, scoring from a coordinate-major store of
    the first `store_d_max()` coordinates."""

    batch: int = 16
    q_heads: int = 32
    kv_heads: Sequence[int] = (32, 8)
    head_dim: int = 128
    seqs: Sequence[int] = (4096, 16384, 32768)
    points: Sequence[tuple[int, float]] = (
        (32, 1 / 8),
        (32, 1 / 4),
        (16, 1 / 8),
        (16, 1 / 16),
        (64, 1 / 4),
    )
    budgets: Sequence[tuple[int, int]] = ()  # (d, tokens kept per step)
    adaptive: bool = False  # keyspace bench and bench_decode.py turn it on
    adaptive_d_max: int = 64
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
        for d, tokens in self.budgets:
            if not 1 <= d <= self.head_dim or tokens < 1:
                raise ValueError(f"budget point (d={d}, {tokens} tokens) needs d in [1, head_dim]"
                                 " and at least 1 token")  # fmt: skip
        if min(self.seqs) < 1 or min(self.batch, self.q_heads, self.input_sets) < 1:
            raise ValueError("batch, heads, seq and input_sets must be positive")

    def store_d_max(self) -> int:
        """Coordinates in the adaptive rows' store: adaptive_d_max, or the largest d if that is
        larger, at most head_dim."""
        largest = max([d for d, _ in self.points] + [d for d, _ in self.budgets], default=1)
        return min(max(self.adaptive_d_max, largest), self.head_dim)

    def k_points(self, seq: int) -> list[tuple[int, float, int | None, int]]:
        """(d, k fraction, token budget or None, k_top) of every point at cache length seq."""
        rows = [(d, frac, None, max(1, round(frac * seq))) for d, frac in self.points]
        return rows + [(d, min(t, seq) / seq, t, min(t, seq)) for d, t in self.budgets]


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


def _time_stages(cfg: BenchConfig, steps, score_fns, scores, k_top: int, attend) -> dict:
    """Graph-timed step and stages of one method; attend(i, idx) is input set i's attention."""
    kernel = {"backend": "triton", "settings": cfg.settings}
    idx = [select_topk(sc, k_top, **kernel) for sc in scores]
    timed = {
        "scores_ms": score_fns,
        "select_ms": [lambda sc=sc: select_topk(sc, k_top, **kernel) for sc in scores],
        "topk_torch_ms": [
            lambda sc=sc: torch.topk(sc, k_top, dim=-1, sorted=False) for sc in scores
        ],
        "attention_ms": [lambda i=i, ix=ix: attend(i, ix) for i, ix in enumerate(idx)],
    }
    row = {"loki_ms": graph_ms(steps, cfg.reps, cfg.replays), "loki_eager_ms": eager_ms(steps)}
    row.update({name: graph_ms(fns, cfg.reps, cfg.replays) for name, fns in timed.items()})
    return row


def _time_loki(sets: list[dict], cfg: BenchConfig, d: int, k_top: int, group: bool) -> dict:
    """Fixed-d Loki: the step, its score pass, select and attention (as the step calls it)."""
    kernel = {"backend": "triton", "settings": cfg.settings}
    steps = [
        lambda s=s: loki_decode(
            s["q"], s["k_low"], s["k_rest"], s["v"], k_top, group_select=group, **kernel
        )
        for s in sets
    ]
    score_fns = [lambda s=s: lowrank_scores(s["q"], s["k_low"], group, **kernel) for s in sets]
    scores = [fn() for fn in score_fns]
    # The step hands per-head attention the score pass's q_low·k_low: time it the same way.
    reuse = cfg.settings.reuse_low_scores and scores[0].shape[1] == sets[0]["q"].shape[1]
    low = [sc if reuse else None for sc in scores]

    def attend(i, idx):
        s = sets[i]
        return sparse_attention(s["q"], s["k_low"], s["k_rest"], s["v"], idx, low_scores=low[i],
                                **kernel)  # fmt: skip

    return _time_stages(cfg, steps, score_fns, scores, k_top, attend)


def _time_adaptive(sets: list[dict], cfg: BenchConfig, r: int, k_top: int, group: bool) -> dict:
    """Adaptive Loki at r coordinates: the step, the coordinate choice + score pass, select and
    attention over the full rotated keys (an empty k_rest)."""
    kernel = {"backend": "triton", "settings": cfg.settings}
    kv_heads, d_max = sets[0]["k_low_t"].shape[1], sets[0]["k_low_t"].shape[2]
    steps = [
        lambda s=s: adaptive_decode(
            s["q"], s["k_low_t"], s["keys"], s["v"], r, k_top, group_select=group, **kernel
        )
        for s in sets
    ]

    def score(s):  # the coordinate choice and the score pass, as the step runs them
        if cfg.settings.adaptive_choice == "kernel":
            return adaptive_fused_scores(s["q"], s["k_low_t"], r, None, group, **kernel)
        coords = adaptive_coords(s["q"], r, kv_heads, d_max)
        return adaptive_scores(s["q"], s["k_low_t"], coords, group, **kernel)

    score_fns = [lambda s=s: score(s) for s in sets]
    scores = [fn() for fn in score_fns]

    def attend(i, idx):
        keys = sets[i]["keys"]
        no_rest = keys[..., keys.shape[-1] :]
        return sparse_attention(sets[i]["q"], keys, no_rest, sets[i]["v"], idx, **kernel)

    return _time_stages(cfg, steps, score_fns, scores, k_top, attend)


def _floor_bytes(cfg: BenchConfig, kv_heads: int, seq: int, d: int, k_top: int, group: bool):
    es = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    qo = 2 * cfg.batch * cfg.q_heads * cfg.head_dim * es
    dense = 2 * cfg.batch * kv_heads * seq * cfg.head_dim * es + qo
    sets = kv_heads if group else cfg.q_heads
    loki = cfg.batch * kv_heads * seq * d * es + cfg.batch * sets * k_top * 2 * cfg.head_dim * es
    return dense, loki + qo


def finish_row(row: dict, floor_gbps: float) -> dict:
    """Speedup, floor ratio, rates and the below-floor flag of a row holding sdpa_ms, loki_ms,
    dense_bytes and loki_bytes (in place; returned too)."""
    row["speedup"] = row["sdpa_ms"] / row["loki_ms"]
    row["floor_speedup"] = row["dense_bytes"] / row["loki_bytes"]
    row["loki_gbps"] = row["loki_bytes"] / row["loki_ms"] / 1e6
    row["loki_pct_floor"] = 100 * row["loki_bytes"] / floor_gbps / 1e6 / row["loki_ms"]
    row["sdpa_pct_floor"] = 100 * row["dense_bytes"] / floor_gbps / 1e6 / row["sdpa_ms"]
    # A baseline at its byte floor allows no more than the floor ratio: above it, distrust it.
    row["baseline_below_floor"] = bool(row["speedup"] > row["floor_speedup"])
    row["flag"] = BELOW_FLOOR if row["baseline_below_floor"] else ""
    return row


def _split_keys(sets: list[dict], d: int) -> None:
    """The fixed-d store of each input set: k_low (B, Hkv, S, d) and k_rest (.., D - d)."""
    for s in sets:
        s["k_low"] = s["keys"][..., :d].contiguous()
        s["k_rest"] = s["keys"][..., d:].contiguous()


def _shape_rows(cfg, sets, kv_heads, seq, dense, peak, log) -> list[dict]:
    """Every point's rows at one (kv_heads, seq): fixed-d Loki, then adaptive at r = d and the
    same k, reading a coordinate-major store of the first store_d_max() coordinates."""
    modes = [True] if kv_heads == cfg.q_heads else [True] + [False] * cfg.per_head_under_gqa
    timers = {"loki": _time_loki} | ({"loki-adaptive": _time_adaptive} if cfg.adaptive else {})
    if cfg.adaptive:
        for s in sets:
            s["k_low_t"] = s["keys"][..., : cfg.store_d_max()].transpose(-1, -2).contiguous()
    points = cfg.k_points(seq)
    rows = []
    for d in sorted({p[0] for p in points}):
        _split_keys(sets, d)
        for (pd, frac, budget, k_top), group in itertools.product(points, modes):
            if pd != d:
                continue
            select = "mha" if kv_heads == cfg.q_heads else ("group" if group else "head")
            dense_b, loki_b = _floor_bytes(cfg, kv_heads, seq, d, k_top, group)
            for method, timer in timers.items():
                row = {
                    "method": method,
                    "batch": cfg.batch,
                    "q_heads": cfg.q_heads,
                    "kv_heads": kv_heads,
                    "head_dim": cfg.head_dim,
                    "seq": seq,
                    "d": d,
                    "k_frac": frac,
                    "k_budget": budget,
                    "k_top": k_top,
                    "select": select,
                    "dtype": cfg.dtype,
                    **dense,
                    **timer(sets, cfg, d, k_top, group),
                    "dense_bytes": dense_b,
                    "loki_bytes": loki_b,
                }
                rows.append(finish_row(row, peak))
                log(format_row(row))
    for s in sets:
        for name in ("k_low", "k_rest", "k_low_t"):
            s.pop(name, None)
    return rows


def run_sweep(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Time dense SDPA (every backend) and Loki over the sweep; returns {"meta", "rows"}."""
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
        dense = time_dense(sets, lambda fns: graph_ms(fns, cfg.reps, cfg.replays))
        log(f"Hkv={kv_heads} S={seq}: dense {dense['sdpa_ms']:.3f} ms ({dense['dense_backend']})"
            f" {dense['dense_ms_by_backend']} unavailable: {dense['dense_unavailable']}")  # fmt: skip
        if dense["dense_backend"] is None:
            raise RuntimeError(f"no SDPA backend ran: {dense['dense_unavailable']}")
        rows += _shape_rows(cfg, sets, kv_heads, seq, dense, peak, log)
        del sets
        torch.cuda.empty_cache()
    return {"meta": meta, "rows": rows}


def save_result(result: dict, folder: Path) -> None:
    """Write a sweep as bench_decode.json (everything) and bench_decode.md (the table)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_decode.json").write_text(dumps_json(result, indent=2, default=str))
    (folder / "bench_decode.md").write_text(markdown_table(result["rows"]) + "\n")


def format_row(row: dict) -> str:
    flag = f" [{BELOW_FLOOR}]" if row["baseline_below_floor"] else ""
    return (
        f"{row['method']:>13} Hkv={row['kv_heads']:>2} S={row['seq']:>5} d={row['d']:>3} "
        f"k={row['k_frac']:.3f} {row['select']:>5}: dense {row['sdpa_ms']:.3f} "
        f"({row['dense_backend']}) loki {row['loki_ms']:.3f} ms "
        f"({row['speedup']:.2f}x, floor {row['floor_speedup']:.2f}x{flag}, "
        f"{row['loki_pct_floor']:.0f}% of floor) | scores {row['scores_ms']:.3f} "
        f"select {row['select_ms']:.3f} (topk {row['topk_torch_ms']:.3f}) "
        f"attn {row['attention_ms']:.3f} eager {row['loki_eager_ms']:.3f}"
    )


TABLE_COLUMNS = [
    ("method", "method", "{}"),
    ("Hkv", "kv_heads", "{}"),
    ("S", "seq", "{}"),
    ("d", "d", "{}"),
    ("k", "k_frac", "{:.3f}"),
    ("select", "select", "{}"),
    ("k_top", "k_top", "{}"),
    ("dense", "dense_backend", "{}"),
    ("dense ms", "sdpa_ms", "{:.3f}"),
    ("Loki ms", "loki_ms", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("floor", "floor_speedup", "{:.2f}x"),
    ("flag", "flag", "{}"),
    ("GB/s", "loki_gbps", "{:.0f}"),
    ("% floor", "loki_pct_floor", "{:.0f}%"),
    ("scores", "scores_ms", "{:.3f}"),
    ("select ms", "select_ms", "{:.3f}"),
    ("topk", "topk_torch_ms", "{:.3f}"),
    ("attn", "attention_ms", "{:.3f}"),
    ("eager", "loki_eager_ms", "{:.3f}"),
]


def markdown_table(rows: Sequence[dict]) -> str:
    """The sweep as a markdown table (times in ms, CUDA-graph replays unless 'eager'); a row
    whose speedup passes its floor ratio says "baseline below its floor" in its flag column."""
    head = "| " + " | ".join(name for name, _, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(TABLE_COLUMNS)

    def cell(value, fmt: str) -> str:
        return "–" if isinstance(value, float) and math.isnan(value) else fmt.format(value)

    body = [
        "| " + " | ".join(cell(row[key], fmt) for _, key, fmt in TABLE_COLUMNS) + " |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])
