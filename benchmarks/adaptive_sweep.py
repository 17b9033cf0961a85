"""The adaptive score pass's launch parameters on one CUDA GPU (issue 23's kernel target).

    PYTHONPATH=. python benchmarks/adaptive_sweep.py --out DIR [--seq 32768] [--r 16 32]

For MHA (32 KV heads) and GQA (8 KV heads, group select), B=16, Hq=32, D=128, fp16, a store of
d_max=64 coordinates: times the fixed-d score pass (`lowrank_scores`, the bar) and the adaptive
pass with the coordinate choice in torch (`adaptive_coords` + `adaptive_scores`) or in the kernel
(`adaptive_fused_scores`), over a grid of (block_s, block_r, warps); then the whole steps, fixed-d
against adaptive with the best score variant, at k = 1/16 and 1/8. Each variant is first checked
against the torch reference. CUDA-graph replays over two input sets, as `keyspace bench` times.
Writes DIR/adaptive_sweep.json. Never imported by the package.
"""

# ruff: noqa: B023  (every closure is captured into its CUDA graph in the iteration that makes it)
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768])
    parser.add_argument("--r", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--d-max", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    import torch

    from keyspace.bench.timing import graph_ms
    from keyspace.kernels import (
        DEFAULT_SETTINGS,
        adaptive_coords,
        adaptive_decode,
        adaptive_fused_scores,
        adaptive_scores,
        adaptive_scores_reference,
        loki_decode,
        lowrank_scores,
    )

    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def save():
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        (args.out / "adaptive_sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}))

    def time(fns):
        return graph_ms(fns, reps=20, replays=5)

    grid = [
        dataclasses.replace(
            DEFAULT_SETTINGS, adaptive_block_s=s, adaptive_block_r=br, adaptive_num_warps=w
        )  # fmt: skip
        for s, br, w in itertools.product((256, 512, 1024, 2048), (16, 32), (4, 8))
    ]
    for seq, (kv_heads, group) in itertools.product(args.seq, ((32, False), (8, True))):
        sets = []
        for _ in range(2):
            q = torch.randn(args.batch, 32, 128, device="cuda", dtype=torch.float16, generator=gen)
            keys, v = (
                torch.randn(
                    args.batch,
                    kv_heads,
                    seq,
                    128,
                    device="cuda",
                    dtype=torch.float16,
                    generator=gen,
                )  # fmt: skip
                for _ in range(2)
            )
            k_low_t = keys[..., : args.d_max].transpose(-1, -2).contiguous()
            sets.append((q, keys, v, k_low_t))
        for r in args.r:
            shape = {"seq": seq, "kv_heads": kv_heads, "group": group, "r": r}
            k_low = [s[1][..., :r].contiguous() for s in sets]
            k_rest = [s[1][..., r:].contiguous() for s in sets]
            fixed = time([lambda i=i: lowrank_scores(sets[i][0], k_low[i], group) for i in (0, 1)])
            rows.append(shape | {"what": "fixed scores", "ms": fixed})
            print(f"{shape} fixed scores {fixed:.3f} ms", flush=True)
            q0, _, _, kt0 = sets[0]
            ref = adaptive_scores_reference(q0, kt0, adaptive_coords(q0, r, kv_heads, args.d_max),
                                            group)  # fmt: skip
            best = {}
            for st in grid:
                for choice in ("torch", "kernel"):
                    st_c = dataclasses.replace(st, adaptive_choice=choice)

                    def score(i, st_c=st_c, choice=choice):
                        q, _, _, kt = sets[i]
                        if choice == "kernel":
                            return adaptive_fused_scores(q, kt, r, None, group, settings=st_c)
                        coords = adaptive_coords(q, r, kv_heads, args.d_max)
                        return adaptive_scores(q, kt, coords, group, settings=st_c)

                    try:
                        err = (score(0) - ref).abs().max().item() / ref.abs().max().item()
                        assert err < 1e-3, f"relative error {err:.2e}"
                        ms = time([lambda i=i, f=score: f(i) for i in (0, 1)])
                    except Exception as exc:  # a launch the card refuses is a row, not a crash
                        rows.append(shape | {"what": f"adaptive {choice}", "error": str(exc)[:200],
                                             "block_s": st.adaptive_block_s})  # fmt: skip
                        continue
                    row = shape | {"what": f"adaptive {choice}", "ms": ms,
                                   "block_s": st.adaptive_block_s, "block_r": st.adaptive_block_r,
                                   "warps": st.adaptive_num_warps}  # fmt: skip
                    rows.append(row)
                    if choice not in best or ms < best[choice][0]:
                        best[choice] = (ms, st_c)
            for choice, (ms, st_c) in best.items():
                print(f"{shape} best adaptive {choice}: {ms:.3f} ms ({ms / fixed:.2f}x fixed) "
                      f"block_s={st_c.adaptive_block_s} block_r={st_c.adaptive_block_r} "
                      f"warps={st_c.adaptive_num_warps}", flush=True)  # fmt: skip
            for frac in (1 / 16, 1 / 8):
                k_top = int(seq * frac)
                loki = time([lambda i=i: loki_decode(sets[i][0], k_low[i], k_rest[i], sets[i][2],
                                                     k_top, group_select=group) for i in (0, 1)])  # fmt: skip
                rows.append(shape | {"what": "fixed step", "k_top": k_top, "ms": loki})
                for choice, (_, st_c) in best.items():
                    ms = time([lambda i=i, st_c=st_c: adaptive_decode(
                        sets[i][0], sets[i][3], sets[i][1], sets[i][2], r, k_top,
                        group_select=group, settings=st_c) for i in (0, 1)])  # fmt: skip
                    rows.append(shape | {"what": f"adaptive step {choice}", "k_top": k_top,
                                         "ms": ms, "block_s": st_c.adaptive_block_s,
                                         "block_r": st_c.adaptive_block_r,
                                         "warps": st_c.adaptive_num_warps})  # fmt: skip
                    print(f"{shape} k={k_top}: fixed step {loki:.3f} ms, adaptive {choice} "
                          f"{ms:.3f} ms ({ms / loki:.2f}x)", flush=True)  # fmt: skip
            save()
        torch.cuda.empty_cache()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
