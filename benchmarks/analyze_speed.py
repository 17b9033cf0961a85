"""Time `analyze` on SmolLM2-shaped moments (2 kinds × 30 layers × 3 KV heads × 64), and report rendering.

Random SPD moments stand in for real ones: eigendecomposition cost does not depend on the values.
Usage: .venv/bin/python benchmarks/analyze_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from keyspace.analyze.pca import AnalyzeConfig, analyze_kind, analyze_run, write_analysis
from keyspace.reports.build import build_report, render
from keyspace.runfolder.store import KINDS, Moments, save_moments, write_manifest

LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 16384


def random_moments(seed: int) -> Moments:
    """SPD second moments of TOKENS tokens with a random mean: (L, H, D, D) float64."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    factor = torch.randn(LAYERS, KV_HEADS, HEAD_DIM, HEAD_DIM, generator=gen, dtype=f64)
    decay = torch.logspace(0, -3, HEAD_DIM, dtype=f64)  # a key-like decaying spectrum
    cov = (factor * decay) @ (factor * decay).transpose(-1, -2)
    mean = torch.randn(LAYERS, KV_HEADS, HEAD_DIM, generator=gen, dtype=f64)
    outer = TOKENS * (cov + mean.unsqueeze(-1) * mean.unsqueeze(-2))
    return Moments(torch.full((LAYERS,), float(TOKENS), dtype=f64), TOKENS * mean, outer)


def write_fake_run(path: Path, seed: int, corpus: str) -> Path:
    path.mkdir(parents=True)
    digest = save_moments(
        path / "moments.safetensors", {k: random_moments(seed + i) for i, k in enumerate(KINDS)}
    )
    manifest = {
        "keyspace_version": "bench",
        "model": {
            "spec": "smollm2-shaped",
            "identity": "bench/smollm2-shaped",
            "architecture": "llama",
        },
        "dataset": {"spec": corpus},
        "tokens": TOKENS,
        "num_layers": LAYERS,
        "num_kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "shards": [],
        "moments": {"path": "moments.safetensors", "sha256": digest},
        "state": "complete",
    }
    write_manifest(path, manifest)
    return path


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds over `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = AnalyzeConfig((0.8, 0.9, 0.95))
    with tempfile.TemporaryDirectory() as tmp:
        run_a = write_fake_run(Path(tmp) / "a", 0, "corpus-a")
        run_b = write_fake_run(Path(tmp) / "b", 10, "corpus-b")
        moments = random_moments(0)
        core, _ = timed(lambda: analyze_kind(moments, config), args.repeats)
        stage, analysis = timed(lambda: analyze_run(run_a, config), args.repeats)
        write, _ = timed(lambda: write_analysis(analysis), args.repeats)
        report = build_report([run_a], None, config)
        render_one, _ = timed(lambda: render(report, Path(tmp) / "out1"), max(1, args.repeats // 2))
        two, _ = timed(
            lambda: build_report([run_a, run_b], Path(tmp) / "out2", config),
            max(1, args.repeats // 2),
        )
    shape = f"2 kinds × {LAYERS} layers × {KV_HEADS} KV heads × {HEAD_DIM}"
    print(
        f"shape: {shape}, thresholds {config.thresholds}, torch threads {torch.get_num_threads()}"
    )
    print(f"PCA + ranks, one kind (in memory):          {core:.3f} s")
    print(f"analyze_run, both kinds (load + sha + PCA):  {stage:.3f} s")
    print(f"write ranks.json + calibration:              {write:.3f} s")
    print(f"analyze total (analyze_run + write):         {stage + write:.3f} s")
    print(f"render report, one run (figures + HTML):     {render_one:.3f} s")
    print(f"build_report, two runs (+ transfer):         {two:.3f} s")


if __name__ == "__main__":
    main()
