"""Loki decode kernels (fixed d, and adaptive at r = d) vs the fastest dense SDPA backend on one
CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_decode.py --out results/ [--set select_method=radix]
    PYTHONPATH=. python benchmarks/bench_decode.py --out DIR --seq 32768 --d 16 32 --k 0.0625 0.125

Checks the Triton steps (fixed-d, adaptive) and every dense backend against the fp32 oracles
first, then times every row and writes `bench_decode.json` and `bench_decode.md` under --out,
rewritten after each (KV heads, S) shape so that a run cut short keeps what it measured.
`--set FIELD=VALUE` (repeatable) times a variant of the kernels' `KernelSettings`. Never imported
by the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes FIELD=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _settings(pairs: list[tuple[str, str]]):
    """DEFAULT_SETTINGS with each FIELD=VALUE applied, parsed by the field's type."""
    import dataclasses

    from keyspace.kernels import DEFAULT_SETTINGS

    types = {f.name: f.type for f in dataclasses.fields(DEFAULT_SETTINGS)}
    parse = {"int": int, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes", "on")}
    unknown = sorted(name for name, _ in pairs if name not in types)
    if unknown:
        raise SystemExit(f"unknown KernelSettings fields {unknown}; known: {sorted(types)}")
    changes = {name: parse[types[name]](value) for name, value in pairs}
    return dataclasses.replace(DEFAULT_SETTINGS, **changes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_decode"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--input-sets", type=int, default=2)
    parser.add_argument("--d", type=int, nargs="+", help="low-rank dims (with --k / --budget)")
    parser.add_argument("--k", type=float, nargs="+", default=[], help="kept fractions")
    parser.add_argument("--budget", type=int, nargs="+", default=[], help="kept tokens")
    parser.add_argument("--no-adaptive", action="store_true", help="skip the adaptive rows")
    parser.add_argument("--check-dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    parser.add_argument(
        "--set", type=_setting, action="append", default=[], metavar="FIELD=VALUE",
        help="a KernelSettings field for the whole run, e.g. attention_block_n=32; repeatable",
    )  # fmt: skip
    args = parser.parse_args()

    import torch

    from keyspace.bench.kernel_checks import check_correctness
    from keyspace.bench.kernels import (
        BELOW_FLOOR,
        BenchConfig,
        markdown_table,
        run_sweep,
        save_result,
    )

    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    points = {}
    if args.d:
        points = {"points": tuple((d, k) for d in args.d for k in args.k)}
        points["budgets"] = tuple((d, b) for d in args.d for b in args.budget)
    cfg = BenchConfig(
        batch=args.batch,
        q_heads=args.heads,
        kv_heads=tuple(args.kv_heads),
        head_dim=args.head_dim,
        seqs=tuple(args.seq),
        dtype=args.dtype,
        input_sets=args.input_sets,
        adaptive=not args.no_adaptive,
        settings=_settings(args.set),
        **points,
    )
    started = time.time()
    checks = [] if args.skip_check else check_correctness(args.check_dtypes, cfg.settings)
    for c in checks:
        print(
            f"check {c['dtype']:>8} {c['case']}: rel err {c['rel_err']:.2e}"
            f" (graph {c['graph_rel_err']:.2e})",
            flush=True,
        )
    result = {"meta": {}, "rows": []}
    for kv_heads, seq in itertools.product(cfg.kv_heads, cfg.seqs):
        shape = dataclasses.replace(cfg, kv_heads=(kv_heads,), seqs=(seq,))
        part = run_sweep(shape, log=lambda line: print(line, flush=True))
        result["rows"] += part["rows"]
        result["meta"] = part["meta"] | {"config": dataclasses.asdict(cfg)}
        result["checks"] = checks
        result["meta"]["command"] = " ".join(sys.argv)
        result["meta"]["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        result["meta"]["wall_s"] = time.time() - started
        save_result(result, args.out)
    print(markdown_table(result["rows"]))
    flagged = [r for r in result["rows"] if r["baseline_below_floor"]]
    if flagged:
        print(f"{len(flagged)} rows: {BELOW_FLOOR} (speedup above the byte-floor ratio)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
