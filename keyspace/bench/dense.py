"""The dense baseline of the kernel benchmark: decode attention through every SDPA backend that
accepts the shape, so that every speedup is over the fastest this machine has.

Backends tried, in order: cuDNN, flash, memory-efficient, and SDPA's default dispatch (no
backend pinned; on Hopper it picks cuDNN for MHA). A backend that raises for the shape is
recorded as unavailable with the first line of its error; the others are timed and the fastest
is the row's baseline.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DENSE_BACKENDS = ("cudnn", "flash", "efficient", "default")
# The dense attention of the e2e bench's dense loop (keyspace.loki.graphs.dense_decode), named in
# its table: SDPA with the padding mask and enable_gqa, no backend pinned, so torch's default
# dispatch picks (cuDNN's decode kernel on the H100 and H200). Unlike the kernel bench, the e2e
# bench does not race the backends above.
E2E_DENSE_BACKEND = "SDPA, default dispatch"
# Errors by which SDPA refuses a shape or a device ("No available kernel", unsupported dtype).
REFUSALS = (RuntimeError, ValueError, NotImplementedError)


def sdpa_backend(name: str):
    """The torch SDPBackend of a DENSE_BACKENDS name; None for the default dispatch."""
    from torch.nn.attention import SDPBackend

    table = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "default": None,
    }
    return table[name]


def sdpa_step(q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, name: str) -> Callable:
    """One dense decode step through backend `name`: q (B, Hq, D), keys and v (B, Hkv, S, D)
    -> (B, Hq, 1, D)."""
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backend(name)
    gqa = q.shape[1] != keys.shape[1]

    def step() -> torch.Tensor:
        pinned = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        with pinned:
            return F.scaled_dot_product_attention(q[:, :, None], keys, v, enable_gqa=gqa)

    return step


def time_dense(
    sets: Sequence[dict], timer: Callable[[list[Callable]], float], step_of=sdpa_step
) -> dict:
    """Time dense decode over every backend in DENSE_BACKENDS.

    sets: input sets {"q", "keys", "v"}; timer: ms per call of a list of callables rotated in
    turn (the sweep's CUDA-graph timer). Each backend first runs once eagerly, so one that
    refuses the shape raises outside any graph capture.

    Returns {"dense_ms_by_backend": {name: ms}, "dense_unavailable": {name: reason},
    "dense_backend": the fastest name (or None), "sdpa_ms": its ms (nan if none ran)}.
    """
    by_backend, unavailable = {}, {}
    for name in DENSE_BACKENDS:
        fns = [step_of(s["q"], s["keys"], s["v"], name) for s in sets]
        try:
            with warnings.catch_warnings():  # a refusing backend warns why, then raises
                warnings.simplefilter("ignore")
                fns[0]()
            by_backend[name] = timer(fns)
        except REFUSALS as err:
            unavailable[name] = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    fastest = min(by_backend, key=by_backend.get) if by_backend else None
    return {
        "dense_ms_by_backend": by_backend,
        "dense_unavailable": unavailable,
        "dense_backend": fastest,
        "sdpa_ms": by_backend[fastest] if fastest else math.nan,
    }
