"""Dense accuracy of a model on the task suite: which tasks can it do at all?

    .venv/bin/python benchmarks/tasks_calibration.py --tasks niah,mk-niah,mv-niah,mq-niah,vt,cwe,fwe \
        --lengths 1024 --out results/tasks-calibration-filler-1024.json

A task the model fails with full attention says nothing about sparse attention, so it stays out of
`keyspace.tasks.DEFAULT_TASKS` (docs/notes/tasks-calibration.md). Writes run_tasks' rows for `full`
(greedy decoding with transformers' DynamicCache, raw completion prompts), every generated answer
in prompt order (for the failure analysis), and the wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="Model alias or path.")
    parser.add_argument("--tasks", default="all", help="Comma list of tasks, or all.")
    parser.add_argument("--lengths", default="1024", help="Comma list of prompt lengths (tokens).")
    parser.add_argument("--count", type=int, default=10, help="Prompts per task and length.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--haystack", default="filler", help="filler, wikitext, pydoc or a path.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from keyspace.models.loading import load_model
    from keyspace.tasks import TASKS, cache_decoder, run_tasks

    tasks = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    lengths = [int(n) for n in args.lengths.split(",")]
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    dense, answers = cache_decoder(), []

    def recorded(model, ids, new_tokens):
        tokens = dense(model, ids, new_tokens)
        answers.append(loaded.tokenizer.decode(tokens.tolist(), skip_special_tokens=True))
        return tokens

    start = time.time()
    with torch.inference_mode():
        rows = run_tasks(
            loaded.model,
            loaded.tokenizer,
            {("full", None, None): recorded},
            tasks,
            lengths,
            count=args.count,
            seed=args.seed,
            haystack=args.haystack,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    doc = {
        "model": args.model,
        "rows": rows,
        "answers": answers,
        "haystack": args.haystack,
        "seconds": time.time() - start,
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
