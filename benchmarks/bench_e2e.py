"""Whole-model decode speed on one CUDA GPU (issue 14): dense and Loki through the same model,
each decode step one CUDA-graph replay, against transformers' own `generate`.

    PYTHONPATH=. python benchmarks/bench_e2e.py --config llama3-8b --batch 16 \\
        --seq 4096 --seq 16384 --seq 32768 --point 32:0.125 --out results/e2e

`--point D:K` times Loki at a fraction k of the context, `--budget-point D:TOKENS` at a token
budget, min(TOKENS, context) kept per step (both repeatable; `keyspace bench --e2e --budget`'s
rows). Without either: --point 32:0.125; with --budget-point alone, budget rows only.

`--loop FIELD=VALUE` (repeatable) sets a field of the loop's `DecodeLoopSettings`;
`--variant NAME:FIELD=VALUE,...` (repeatable) times each named loop variant on the same prefilled
caches, e.g. issue 24's A/B:
`--variant fused: --variant unfused:fuse_projections=false --variant bmm:query_rotation=bmm`.
`--attention` instead times the dense decode attention candidates alone (one layer's
cache): the loop's own (`sdpa_gqa`, `keyspace.loki.graphs.dense_decode`) against the ones it beat
(docs/notes/e2e-decode.md, attempt 2), which live here, under each SDPA backend. Writes e2e.json
and e2e.md (or dense_attention.json) under --out. Never imported by the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def _loop_settings(pairs: list[str], base=None):
    """DecodeLoopSettings (or `base`) with each FIELD=VALUE applied, parsed by the field's type;
    `kernel.FIELD=VALUE` sets a field of the Loki kernels' KernelSettings."""
    from keyspace.kernels import DEFAULT_SETTINGS
    from keyspace.loki.graphs import DecodeLoopSettings

    base = base or DecodeLoopSettings()
    loop, kernel = {}, {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        owner = kernel if name.startswith("kernel.") else loop
        owner[name.removeprefix("kernel.")] = value
    loop = _parsed(loop, base)
    if kernel:
        loop["kernels"] = dataclasses.replace(
            base.kernels or DEFAULT_SETTINGS, **_parsed(kernel, DEFAULT_SETTINGS)
        )
    return dataclasses.replace(base, **loop)


def _parsed(values: dict[str, str], settings) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(settings)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise SystemExit(
            f"unknown {type(settings).__name__} fields {unknown}; known: {sorted(types)}"
        )
    parse = {"int": int, "bool": lambda v: v.lower() in ("1", "true", "yes", "on")}
    return {name: parse.get(types[name], str)(value) for name, value in values.items()}


# --- the dense decode candidates (only the winner, sdpa_gqa, is in the package) -----------------

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def sdpa_backend(name: str):
    """A context that pins SDPA to the backend `name` ("auto": torch's own choice)."""
    import contextlib

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


def dense_sdpa_fold(query, layer, end, scale):
    """SDPA with each KV head's query group on the query-length axis and a mask past the valid
    length: (B, Hq, 1, D) -> (B, 1, Hq, D)."""
    import torch.nn.functional as F

    from keyspace.loki.graphs import _valid_mask

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


def dense_varlen(query, layer, end, scale):
    """flash attention over exactly the valid length (`varlen_attn` with `seqused_k`)."""
    import inspect

    import torch
    from torch.nn.attention.varlen import varlen_attn

    batch, q_heads, _, dim = query.shape
    capacity, kv_heads = layer.key_store.shape[1], layer.key_store.shape[2]
    rows = torch.arange(batch + 1, device=query.device, dtype=torch.int32)
    # torch 2.11's varlen_attn takes GQA without a flag; later versions ask for enable_gqa.
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    out = varlen_attn(
        query.reshape(batch, q_heads, dim),
        layer.key_store.view(batch * capacity, kv_heads, dim),
        layer.value_store.view(batch * capacity, kv_heads, dim),
        rows,
        rows * capacity,
        1,
        end,
        scale=scale,
        seqused_k=layer.seqlens.to(torch.int32),
        **gqa,
    )
    return out.reshape(batch, 1, q_heads, dim)


def dense_candidates() -> dict:
    from keyspace.loki.graphs import dense_decode

    return {"sdpa_gqa": dense_decode, "sdpa_fold": dense_sdpa_fold, "varlen": dense_varlen}


def _point(text: str) -> tuple[int, float]:
    d, _, k = text.partition(":")
    return int(d), float(k)


def _budget_point(text: str) -> tuple[int, int]:
    """D:TOKENS, e.g. 32:2048: ASCII whole numbers, both at least 1."""
    from keyspace.errors import KeyspaceError
    from keyspace.options import parse_int

    d, colon, tokens = text.partition(":")
    try:
        if not colon:
            raise KeyspaceError("no ':'", "")
        return parse_int(d, "d", 1, 1 << 16), parse_int(tokens, "tokens", 1, 1 << 24)
    except KeyspaceError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not D:TOKENS (whole numbers from 1, e.g. 32:2048)"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="llama3-8b, llama2-7b or smollm2-135m")
    parser.add_argument("--model", default=None, help="a real model (alias or folder)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--seq", type=int, action="append")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--point", type=_point, action="append", help="d:k, e.g. 32:0.125")
    parser.add_argument(
        "--budget-point",
        type=_budget_point,
        action="append",
        help="d:tokens, e.g. 32:2048: min(tokens, context) kept per step",
    )
    parser.add_argument("--per-head", action="store_true", help="per-query-head selection")
    parser.add_argument("--generate-steps", type=int, default=4)
    parser.add_argument("--no-split", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--loop", action="append", default=[], help="FIELD=VALUE")
    parser.add_argument("--variant", action="append", default=[], help="NAME:FIELD=VALUE,...")
    parser.add_argument("--attention", action="store_true", help="time dense candidates alone")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def e2e_config(args: argparse.Namespace, loop=None):
    """The sweep's E2EConfig from the parsed arguments (no GPU needed)."""
    from keyspace.bench import e2e

    default_points = () if args.budget_point else ((32, 0.125),)
    return e2e.E2EConfig(
        config=args.config or (None if args.model else "llama3-8b"),
        model=args.model,
        layers=args.layers,
        batches=tuple(args.batch or (16,)),
        seqs=tuple(args.seq or (4096, 16384, 32768)),
        steps=args.steps,
        points=tuple(args.point or default_points),
        budgets=tuple(args.budget_point or ()),
        group_select=not args.per_head,
        generate_steps=args.generate_steps,
        split=not args.no_split,
        check=not args.no_check,
        loop=loop if loop is not None else _loop_settings(args.loop),
    )


def graph_ms(fn, replays: int = 20, reps: int = 5) -> float:
    """Median ms per call of `fn` captured in a CUDA graph (after two eager warm-up calls)."""
    import statistics

    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def time_dense_attention(shape, batch: int, seq: int, bucket: int = 256) -> list[dict]:
    """Each dense decode candidate (kind x SDPA backend) alone, on one layer's static cache holding
    `seq` valid tokens inside a bucket that ends past them: relative L2 error against the fp32
    oracle, ms per call (graph replays), and GB/s of the valid K and V. The last row is SDPA over
    exactly the valid tokens with no mask (flash), which no single graph can do as S grows."""
    import torch
    import torch.nn.functional as F

    from keyspace.kernels import dense_attention_reference
    from keyspace.loki.graphs import bucket_end
    from keyspace.loki.static_cache import StaticKVLayer

    candidates_by_kind = dense_candidates()

    dtype = {2: torch.float16, 4: torch.float32}[shape.element_size]
    kv_shape = (batch, shape.kv_heads, seq, shape.head_dim)
    keys, values = (torch.randn(kv_shape, device="cuda", dtype=dtype) for _ in range(2))
    query = torch.randn(batch, shape.q_heads, 1, shape.head_dim, device="cuda", dtype=dtype)
    layer = StaticKVLayer(seq + bucket)
    layer.update(keys, values)
    end, scale = bucket_end(seq + 1, bucket, layer.capacity), shape.head_dim**-0.5
    oracle = dense_attention_reference(query[:, :, 0], keys, values, scale)  # [B, Hq, D] fp32
    gbytes = 2 * keys.numel() * keys.element_size() / 1e9
    candidates = [("varlen", "auto")] + [
        (kind, backend)
        for kind in candidates_by_kind
        if kind != "varlen"
        for backend in SDPA_BACKENDS
    ]
    rows = []
    for kind, backend in candidates:

        def call(kind=kind, backend=backend):
            with sdpa_backend(backend):
                return candidates_by_kind[kind](query, layer, end, scale)

        rows.append(_time_candidate(f"{kind}/{backend}", call, oracle, gbytes))

    def exact():
        with sdpa_backend("flash"):
            out = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    rows.append(_time_candidate("exact length, no mask/flash", exact, oracle, gbytes))
    return [{**row, "batch": batch, "seq": seq, "view": end} for row in rows]


def _time_candidate(name: str, call, oracle, gbytes: float) -> dict:
    try:
        out = call()[:, 0].float()  # [B, Hq, D]
        err = float((out - oracle).norm() / oracle.norm())
        ms = graph_ms(call)
    except Exception as error:  # a backend that refuses these inputs
        return {"candidate": name, "error": f"{type(error).__name__}: {str(error)[:120]}"}
    return {"candidate": name, "rel_err": err, "ms": ms, "gbps": gbytes / ms * 1e3}


def main() -> int:
    args = parse_args()

    import torch

    if not torch.cuda.is_available():
        print("Error: the end-to-end bench needs a CUDA GPU.", file=sys.stderr)
        return 2
    from keyspace.bench import e2e, shapes

    loop = _loop_settings(args.loop)
    cfg = e2e_config(args, loop)
    variants = None
    if args.variant:
        variants = {}
        for text in args.variant:
            name, _, fields = text.partition(":")
            variants[name] = _loop_settings([f for f in fields.split(",") if f], loop)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    if args.attention:
        dtype_size = 2 if cfg.dtype in ("float16", "bfloat16") else 4
        shape = shapes.Shape.from_config(shapes.model_config(cfg.config or "llama3-8b"), dtype_size)
        rows = []
        for batch in cfg.batches:
            for seq in cfg.seqs:
                rows += time_dense_attention(shape, batch, seq, loop.bucket)
                torch.cuda.empty_cache()
        for row in rows:
            print(json.dumps(row))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "dense_attention.json").write_text(json.dumps(rows, indent=2))
        return 0

    def save(result: dict) -> None:
        if args.out:
            e2e.save_result(result, args.out)

    result = e2e.run_e2e(cfg, log, variants, save)
    save(result)
    table = e2e.markdown_table(result["rows"])
    for check in result["checks"]:
        print(f"check {check['check']}: {check['value']:.3f}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
