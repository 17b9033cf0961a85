"""Stage-by-stage tuning of the Loki decode kernels: times launch-parameter variants per stage.

    PYTHONPATH=. python benchmarks/tune_decode.py --out results/

Each variant overrides a module-level tuning constant of a kernel file, then times that stage as
CUDA-graph replays over rotating input sets. Prints one line per (shape, stage, variant).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path


def _variants_arg(text: str) -> dict:
    """--variants: inline JSON, or the path of a JSON file."""
    return json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/tune_decode"))
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument(
        "--stages", nargs="+", default=["scores", "select", "attention", "step"],
        choices=["scores", "select", "attention", "step"],
    )  # fmt: skip
    parser.add_argument("--k-frac", type=float, default=0.125)
    parser.add_argument(
        "--variants", type=_variants_arg, default=None,
        help="JSON or a JSON file, {stage: [{CONSTANT: value, ...}, ...]}: replaces the lists",
    )  # fmt: skip
    args = parser.parse_args()

    import importlib

    import torch

    # The package re-exports functions under the module names, so import the modules by path.
    ls = importlib.import_module("keyspace.kernels.lowrank_scores")
    sel = importlib.import_module("keyspace.kernels.select")
    sa = importlib.import_module("keyspace.kernels.sparse_attention")
    dec = importlib.import_module("keyspace.kernels.decode")
    from keyspace.kernels.bench import BenchConfig, _graph_ms, _make_inputs

    variants = {
        "scores": (
            ls,
            [
                {"BLOCK_S": b, "NUM_WARPS": w}
                for b, w in itertools.product((128, 256, 512, 1024), (4, 8))
            ],
        ),
        "select": (
            sel,
            [
                {"METHOD": "radix", "CAND_BISECT": True},
                {"METHOD": "sampled", "CAND_BISECT": False},
                {"METHOD": "sampled", "CAND_BISECT": True},
                {"METHOD": "bisect", "CAND_BISECT": True},
            ],
        ),
        "step": (
            dec,
            [
                {"PIPELINE": p, "PIPELINE_MIN_SETS": m}
                for p, m in ((False, 256), (True, 256), (True, 0))
            ],
        ),
        "attention": (
            sa,
            [
                {
                    "BLOCK_N": n,
                    "NUM_WARPS": 4,
                    "NUM_STAGES": st,
                    "PROGRAMS_PER_SM": p,
                    "FUSE_REDUCE": r,
                }
                for (n, st, p), r in itertools.product(
                    [(64, 2, 4), (64, 2, 2), (128, 2, 2), (32, 3, 4)], (False, True)
                )
            ],
        ),
    }
    for name, options in (args.variants or {}).items():
        module = variants[name][0] if name in variants else dec
        variants[name] = (module, options)
    variants = {name: variants[name] for name in args.stages}
    cfg = BenchConfig(input_sets=2, reps=9, replays=5)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for kv_heads, seq in itertools.product(args.kv_heads, args.seq):
        sets = _make_inputs(cfg, kv_heads, seq, gen)
        d, k_top, group = 32, int(seq * args.k_frac), True
        for s in sets:
            s["k_low"], s["k_rest"] = (
                s["keys"][..., :d].contiguous(),
                s["keys"][..., d:].contiguous(),
            )
        scores = [ls._lowrank_scores_triton(s["q"], s["k_low"], group, None) for s in sets]
        idx = [sel._select_topk_triton(sc, k_top, None) for sc in scores]
        stage_fns = {
            "scores": [
                lambda s=s, g=group: ls._lowrank_scores_triton(s["q"], s["k_low"], g, None)
                for s in sets
            ],
            "select": [
                lambda sc=sc, k=k_top: sel._select_topk_triton(sc, k, None) for sc in scores
            ],
            "step": [
                lambda s=s, g=group, k=k_top: dec._loki_decode_triton(
                    s["q"], s["k_low"], s["k_rest"], s["v"], k, 1 / math.sqrt(128), g, None
                )
                for s in sets
            ],
            "attention": [
                lambda s=s, i=i: sa._sparse_attention_triton(
                    s["q"], s["k_low"], s["k_rest"], s["v"], i, 1 / math.sqrt(128)
                )
                for s, i in zip(sets, idx, strict=True)
            ],
        }
        for stage, (module, options) in variants.items():

            def target(key, module=module):
                """(module, attribute); "file.NAME" names a constant of another kernel file."""
                if "." not in key:
                    return module, key
                name, attr = key.rsplit(".", 1)
                return importlib.import_module(f"keyspace.kernels.{name}"), attr

            saved = {k: getattr(*target(k)) for k in options[0]}
            for option in options:
                for k, v in option.items():
                    setattr(*target(k), v)
                if stage == "select":  # every variant must give an exact top-k
                    for sc in scores:
                        got = sc.gather(-1, sel._select_topk_triton(sc, k_top, None).long())
                        want = torch.topk(sc, k_top, dim=-1).values
                        if not torch.equal(got.sort(-1).values, want.sort(-1).values):
                            raise SystemExit(f"select {option} is not an exact top-k")
                try:
                    ms = _graph_ms(stage_fns[stage], cfg.reps, cfg.replays)
                except Exception as err:  # a variant that does not compile or fit
                    ms = float("nan")
                    print(f"  {stage} {option}: {type(err).__name__}: {str(err)[:100]}")
                results.append(
                    {"kv_heads": kv_heads, "seq": seq, "stage": stage, **option, "ms": ms}
                )
                print(f"Hkv={kv_heads} S={seq} {stage:>9} {option}: {ms:.4f} ms", flush=True)
            for k, v in saved.items():
                setattr(*target(k), v)
        saved_method = sel.METHOD
        sel.METHOD = "sampled"
        parts = (
            ("sampled: bracket only", 1),
            ("sampled: bracket + pass", 2),
            ("sampled: all three", 0),
        )
        for name, stop in parts if "select" in args.stages else ():
            ms = _graph_ms(
                [
                    lambda sc=sc, s=stop, k=k_top: sel._select_topk_triton(sc, k, None, s)
                    for sc in scores
                ],
                cfg.reps,
                cfg.replays,
            )
            results.append({"kv_heads": kv_heads, "seq": seq, "stage": name, "ms": ms})
            print(f"Hkv={kv_heads} S={seq} {name}: {ms:.4f} ms", flush=True)
        sel.METHOD = saved_method
        for name, fn in (
            ("torch.topk k=S/8", lambda sc, k=k_top: torch.topk(sc, k, dim=-1, sorted=False)),
            ("select k=1", lambda sc: sel._select_topk_triton(sc, 1, None)),
            ("select k=S", lambda sc, k=seq: sel._select_topk_triton(sc, k, None)),
        ):
            ms = _graph_ms([lambda sc=sc, fn=fn: fn(sc) for sc in scores], cfg.reps, cfg.replays)
            results.append({"kv_heads": kv_heads, "seq": seq, "stage": name, "ms": ms})
            print(f"Hkv={kv_heads} S={seq} {name}: {ms:.4f} ms", flush=True)
        del sets, scores, idx
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_decode.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
