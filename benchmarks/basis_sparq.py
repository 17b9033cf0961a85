"""Is it the basis or the per-query choice? SparQ's coordinate choice inside Loki's PCA basis.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/basis_sparq.py --run runs/wt-16k \
        --task niah-uuid --length 4096 --count 10 --out results/basis-sparq-cpu-4096-uuid.json

At d=16 on the H200 table (docs/notes/tasks-h200-smollm2.md), Loki kept 0.02 of the UUID needles
and SparQ 0.82. Loki scores every query on the same first d PCA coordinates; SparQ picks, per
query, the d raw coordinates where |q| is largest. `basis-sparq` (this study's own Method,
registered by `main` only) does SparQ's per-query pick inside the PCA basis: rotate q and k into
the basis, keep each query's d largest |q~| coordinates, score, then exact top-k. If it recovers
SparQ's accuracy, the per-query choice is what Loki lacks, not the raw coordinates. keyspace's
`loki-adaptive` grew out of it: with no key scale (sigma = 1) it is the same selection.

Every variant decodes in masked mode (dense prefill, then ceil(k·context) keys per step), so
only the selection differs. Writes run_tasks' rows (with per-prompt scores and the paired
difference against full) and the wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from keyspace.loki import SparseSettings, get_method, register_method
from keyspace.loki.methods import LayerInputs, Method, Style
from keyspace.loki.methods.base import loki_cost
from keyspace.loki.methods.common import keep_top, masked, rotate
from keyspace.loki.methods.sparq import sparq_scores
from keyspace.models.loading import load_model
from keyspace.tasks import cache_decoder, masked_decoder, run_tasks
from keyspace.validate.config import ValidateConfig
from keyspace.validate.inputs import open_inputs


def basis_sparq(inp: LayerInputs) -> torch.Tensor:
    """SparQ's step 1+2 on q~ = B q and k~ = A k: each query's d largest-|q~| coordinates, top-k."""
    query = rotate(inp.query, inp.basis if inp.query_basis is None else inp.query_basis)
    approx = sparq_scores(query, rotate(inp.key, inp.basis), inp.dims)
    return masked(inp.exact_scores, keep_top(approx, inp.budget, inp.causal))


BASIS_SPARQ = Method(
    "basis-sparq",
    basis_sparq,
    cost=loki_cost,
    decode="masked-row",
    style=Style("#8c564b", "X", "SparQ in Loki's basis"),
    uses_d=True,
    uses_k=True,
    uses_basis=True,
    in_default_grid=False,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="Run folder with calibration.safetensors.")
    parser.add_argument("--task", default="niah-uuid")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--k", type=float, default=0.125)
    parser.add_argument("--ds", default="16,32", help="Comma list of d.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    register_method(BASIS_SPARQ)
    inputs = open_inputs(ValidateConfig(run=args.run, d="16", k=str(args.k), methods="loki"))
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    basis = inputs.components
    variants = {("full", None, None): cache_decoder()}
    for d in (int(x) for x in args.ds.split(",")):
        dims = torch.full(tuple(basis.shape[:2]), d, dtype=torch.long)
        for method in ("loki", "sparq", "basis-sparq"):
            uses_basis = get_method(method).uses_basis
            settings = SparseSettings(
                method, k=args.k, dims=dims, basis=basis if uses_basis else None
            )
            variants[(method, d, args.k)] = masked_decoder(settings)
    start = time.perf_counter()
    rows = run_tasks(
        loaded.model, loaded.tokenizer, variants, [args.task], [args.length], args.count,
        seed=0, haystack="filler", log=print, batch=args.count,
    )  # fmt: skip
    args.out.write_text(
        json.dumps(
            {"rows": rows, "seconds": time.perf_counter() - start, "run": args.run}, indent=1
        )
    )


if __name__ == "__main__":
    main()
