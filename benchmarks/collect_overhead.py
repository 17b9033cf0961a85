"""Collect overhead on the CPU: plain forward vs `keyspace collect`, and peak RSS vs tokens.

    .venv/bin/python benchmarks/collect_overhead.py --tokens 8192 --rss-tokens 4096,16384

Prints a markdown table for docs/benchmarks.md. Needs the smollm2-135m alias (fetched once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


def plain_forward_tps(model, windows: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for row in windows:
            model(row[None], use_cache=False)
    return windows.numel() / (time.perf_counter() - start)


def collect_tps(dataset: str, tokens: int, out: Path) -> float:
    from keyspace.collect.runner import CollectConfig, collect

    result = collect(
        CollectConfig(
            model="smollm2-135m", dataset=dataset, out=out, window=1024, max_tokens=tokens
        )
    )
    return result.tokens / result.seconds


def peak_rss_mb(dataset: str, tokens: int, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "keyspace",
        "collect",
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--window",
        "1024",
        "--max-tokens",
        str(tokens),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"collect failed: {cmd}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-tokens", default="4096,16384")
    args = parser.parse_args()
    from keyspace.collect.corpora import tokenize_windows
    from keyspace.models.loading import load_model

    dataset = str(WIKITEXT) if WIKITEXT.is_file() else "pydoc"
    loaded = load_model("smollm2-135m")
    windows = tokenize_windows(dataset, loaded.tokenizer, 1024, args.tokens).windows
    plain, collected = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so machine noise hits both alike
            plain.append(plain_forward_tps(loaded.model, windows))
            collected.append(collect_tps(dataset, args.tokens, Path(tmp) / f"run{i}"))
        rss = {
            n: peak_rss_mb(dataset, n, Path(tmp) / f"rss{n}")
            for n in map(int, args.rss_tokens.split(","))
        }
    p, c = statistics.median(plain), statistics.median(collected)
    print(
        "| tokens | plain forward tok/s | collect tok/s | overhead | threads |\n|---|---|---|---|---|"
    )
    print(
        f"| {args.tokens} | {p:.0f} | {c:.0f} | {100 * (p / c - 1):.1f}% | {torch.get_num_threads()} |"
    )
    print("\n| collect tokens | peak RSS (MB) |\n|---|---|")
    for n, mb in rss.items():
        print(f"| {n} | {mb:.0f} |")


if __name__ == "__main__":
    main()
