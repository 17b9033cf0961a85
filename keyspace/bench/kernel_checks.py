"""The kernels' GPU correctness check that `keyspace bench` runs before timing: every stage and
the whole step, eager and replayed from a CUDA graph, against the fp32 torch oracle."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from keyspace.bench.kernels import DTYPES
from keyspace.kernels import (
    DEFAULT_SETTINGS,
    KernelSettings,
    dense_attention_reference,
    loki_decode,
    lowrank_scores,
    lowrank_scores_reference,
    select_topk,
    sparse_attention_reference,
)

# Largest relative L2 error accepted against the fp32 oracle, per dtype.
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}


def _graph_replay(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn's result when captured into a CUDA graph and replayed (the path the sweep times)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return out


def _assert_top_k(scores: torch.Tensor, idx: torch.Tensor, k_top: int, lens, what: str) -> None:
    """idx (B, H, k) holds, per row, min(k_top, length) valid positions whose fp32 reference
    scores are a top set: none below an unchosen score (up to the fp32 summation order)."""
    batch, heads, seq = scores.shape
    valid = torch.ones(batch, seq, dtype=torch.bool, device=scores.device)
    if lens is not None:
        valid = torch.arange(seq, device=scores.device)[None, :] < lens[:, None]
    valid = valid[:, None, :].expand(batch, heads, seq)
    slots = torch.where(idx >= 0, idx.long(), seq)  # unused slots land in a spare column
    chosen = torch.zeros(batch, heads, seq + 1, dtype=torch.bool, device=scores.device)
    chosen = chosen.scatter_(2, slots, True)[..., :seq]
    want = valid.sum(-1).clamp(max=k_top)
    assert torch.equal(chosen.sum(-1), want), f"{what}: wrong number of chosen positions"
    assert not (chosen & ~valid).any(), f"{what}: a chosen position past the sequence"
    finite = torch.where(valid, scores, 0.0).abs().amax()
    low = torch.where(chosen, scores, float("inf")).amin(-1)
    high = torch.where(valid & ~chosen, scores, float("-inf")).amax(-1)
    assert (low >= high - 1e-5 * finite).all(), f"{what}: the chosen positions are not a top-k"


def check_correctness(
    dtypes: Sequence[str] = ("float16", "bfloat16", "float32"),
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> list[dict]:
    """Triton step vs the fp32 oracles on the GPU, as plain launches and replayed from a CUDA
    graph (with the default settings, the batch pipeline at 512 index sets); raises
    AssertionError past REL_TOL.

    The selection is checked to be a top-k of the fp32 reference scores; the attention is then
    compared with the fp32 reference over the very positions chosen, since exactly tied scores
    at the k-th may be chosen either way. At k_top = S it is compared with dense attention."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    kernel = {"backend": "triton", "settings": settings}
    cases = [  # (B, Hq, Hkv, S, D, d, k_top, group, ragged)
        (4, 32, 32, 4096, 128, 32, 512, False, False),
        (4, 32, 8, 4133, 128, 32, 1033, True, True),
        (4, 32, 8, 4096, 128, 16, 512, False, False),
        (2, 9, 3, 1027, 64, 64, 7, True, True),
        (2, 8, 2, 2048, 128, 1, 2048, False, False),
        (16, 32, 32, 4096, 128, 32, 512, False, True),
    ]
    results = []
    for name, case in itertools.product(dtypes, cases):
        batch, hq, hkv, seq, dim, d, k_top, group, ragged = case
        dtype = DTYPES[name]

        def rnd(*shape, dtype=dtype):
            return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

        q, keys, v = rnd(batch, hq, dim), rnd(batch, hkv, seq, dim), rnd(batch, hkv, seq, dim)
        lens = None
        if ragged:
            lens = torch.randint(1, seq + 1, (batch,), device="cuda", generator=gen)
            lens[0] = seq
        k_low, k_rest = keys[..., :d].contiguous(), keys[..., d:].contiguous()
        scale = 1.0 / math.sqrt(dim)

        def step(
            q=q, k_low=k_low, k_rest=k_rest, v=v, k_top=k_top, group=group, lens=lens, scale=scale
        ):
            return loki_decode(q, k_low, k_rest, v, k_top, scale, group, lens, **kernel)

        what = f"{name} {case}"
        scores = lowrank_scores(q, k_low, group, lens, **kernel)
        idx = select_topk(scores, k_top, lens, **kernel)
        _assert_top_k(lowrank_scores_reference(q, k_low, group, lens), idx, k_top, lens, what)
        ref = sparse_attention_reference(q, k_low, k_rest, v, idx, scale).float()
        if k_top == seq:
            ref = dense_attention_reference(q, keys, v, scale, lens)
        errs = [
            ((out.float() - ref).norm() / ref.norm()).item()
            for out in (step(), _graph_replay(step))
        ]
        results.append({"dtype": name, "case": case, "rel_err": errs[0], "graph_rel_err": errs[1]})
        for err in errs:
            assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e}"
    return results
