"""GPU timers of the kernel benchmark: CUDA-graph replays rotating over input sets, plain
launches, and the card's measured memory rates (the byte floor's rate)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence

import torch


def memory_bandwidth_gbps(nbytes: int = 4 << 30) -> dict:
    """Measured DRAM rates in GB/s: a device-to-device copy (read + write) and a read-only sum.

    Decode reads far more than it writes, so the read rate is the byte floor's rate.
    """
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    copy_ms = graph_ms([lambda: dst.copy_(src)], reps=10, replays=3)
    read_ms = graph_ms([lambda: src.sum(dtype=torch.float32)], reps=10, replays=3)
    return {"copy_gbps": 2 * nbytes / copy_ms / 1e6, "read_gbps": nbytes / read_ms / 1e6}


def graph_ms(fns: Sequence[Callable[[], object]], reps: int, replays: int) -> float:
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


def eager_ms(fns: Sequence[Callable[[], object]]) -> float:
    """Median ms of plain launches (Python and launch overhead included), rotating input sets."""
    import triton

    cycle = itertools.cycle(fns)
    return triton.testing.do_bench(lambda: next(cycle)(), warmup=25, rep=100, return_mode="median")
