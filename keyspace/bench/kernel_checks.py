"""The kernels' GPU correctness check that `keyspace bench` runs before timing: every stage and
the whole step (fixed-d and adaptive), eager and replayed from a CUDA graph, against the fp32
torch oracle; and every dense SDPA backend the sweep may take as its baseline."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from keyspace.bench.dense import DENSE_BACKENDS, REFUSALS, sdpa_step
from keyspace.bench.kernels import DTYPES
from keyspace.kernels import (
    DEFAULT_SETTINGS,
    KernelSettings,
    adaptive_coords,
    adaptive_decode,
    adaptive_scores,
    adaptive_scores_reference,
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
    return results + check_adaptive(dtypes, settings) + check_dense_backends(dtypes)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_adaptive(
    dtypes: Sequence[str] = ("float16", "bfloat16", "float32"),
    settings: KernelSettings = DEFAULT_SETTINGS,
) -> list[dict]:
    """The adaptive step as `check_correctness` checks the fixed-d one: its scores against the
    fp32 reference, its selection a top-k of them, the step eager and from a CUDA graph against
    the fp32 attention over the chosen positions (dense attention at r = D, k_top = S). The last
    case has 512 index sets, so its graph takes the two-stream batch pipeline."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    kernel = {"backend": "triton", "settings": settings}
    cases = [  # (B, Hq, Hkv, S, D, d_max, r, k_top, group, ragged)
        (4, 32, 32, 4096, 128, 64, 16, 256, False, False),
        (4, 32, 8, 4133, 128, 64, 32, 517, True, True),
        (4, 32, 8, 4096, 128, 64, 16, 512, False, False),
        (2, 9, 3, 1027, 64, 64, 64, 1027, True, True),
        (16, 32, 32, 4096, 128, 64, 16, 256, False, True),
    ]
    results = []
    for name, case in itertools.product(dtypes, cases):
        batch, hq, hkv, seq, dim, d_max, r, k_top, group, ragged = case
        dtype = DTYPES[name]
        q = torch.randn(batch, hq, dim, device="cuda", dtype=dtype, generator=gen)
        keys, v = (
            torch.randn(batch, hkv, seq, dim, device="cuda", dtype=dtype, generator=gen)
            for _ in range(2)
        )
        k_low_t = keys[..., :d_max].transpose(-1, -2).contiguous()  # [B, Hkv, d_max, S]
        lens = torch.randint(1, seq + 1, (batch,), device="cuda", generator=gen) if ragged else None
        if lens is not None:
            lens[0] = seq
        what = f"adaptive {name} {case}"
        coords = adaptive_coords(q, r, hkv, d_max)
        scores = adaptive_scores(q, k_low_t, coords, group, lens, **kernel)
        ref_scores = adaptive_scores_reference(q, k_low_t, coords, group, lens)
        finite = torch.isfinite(ref_scores)
        assert torch.equal(finite, torch.isfinite(scores)), f"{what}: -inf past seqlens differs"
        score_err = _rel_err(scores[finite], ref_scores[finite])
        assert score_err <= 1e-5, f"{what}: score relative error {score_err:.2e}"
        idx = select_topk(scores, k_top, lens, **kernel)
        _assert_top_k(ref_scores, idx, k_top, lens, what)
        ref = sparse_attention_reference(q, keys, keys[..., dim:], v, idx).float()
        if k_top == seq and r == dim:
            ref = dense_attention_reference(q, keys, v, None, lens)

        def step(q=q, k_low_t=k_low_t, keys=keys, v=v, r=r, k_top=k_top, group=group, lens=lens):
            return adaptive_decode(q, k_low_t, keys, v, r, k_top, None, None, group, lens, **kernel)

        errs = [_rel_err(out, ref) for out in (step(), _graph_replay(step))]
        results.append({"dtype": name, "case": ("adaptive", *case), "rel_err": errs[0],
                        "graph_rel_err": errs[1]})  # fmt: skip
        for err in errs:
            assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e}"
    return results


def check_dense_backends(dtypes: Sequence[str] = ("float16",)) -> list[dict]:
    """Every SDPA backend the sweep may take as its dense baseline, against the fp32 oracle, MHA
    and GQA; one that refuses the shape is skipped here as it is in the sweep."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    results = []
    for name, kv_heads, backend in itertools.product(dtypes, (32, 8), DENSE_BACKENDS):
        dtype = DTYPES[name]
        q = torch.randn(4, 32, 128, device="cuda", dtype=dtype, generator=gen)
        keys, v = (
            torch.randn(4, kv_heads, 1027, 128, device="cuda", dtype=dtype, generator=gen)
            for _ in range(2)
        )
        try:
            out = sdpa_step(q, keys, v, backend)()[:, :, 0]  # [B, Hq, D]
        except REFUSALS:
            continue
        err = _rel_err(out, dense_attention_reference(q, keys, v))
        case = ("dense", backend, kv_heads)
        results.append({"dtype": name, "case": case, "rel_err": err, "graph_rel_err": err})
        assert err <= REL_TOL[dtype], f"dense {backend} {name} Hkv={kv_heads}: error {err:.2e}"
    return results
