"""Argument checks and backend choice shared by the decode kernels.

Every public kernel function validates its arguments here and raises `ValueError` with a message
that names the offending argument, so a caller learns about a bad shape before a kernel launches.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors, torch elsewhere; `backend` forces one (tests use "triton" on CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return all(t.is_cuda for t in tensors)
    return backend == "triton"


def check_cache(
    q: torch.Tensor, k_low: torch.Tensor, k_rest: torch.Tensor | None, v: torch.Tensor | None
) -> tuple[int, int, int, int, int, int]:
    """Check the decode operands; return (B, Hq, Hkv, S, d, D).

    q (B, Hq, D), k_low (B, Hkv, S, d), k_rest (B, Hkv, S, D - d), v (B, Hkv, S, D).
    `k_rest` and `v` may be None for the score stage, which reads only `q` and `k_low`.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, q_heads, head_dim), got shape {tuple(q.shape)}")
    if k_low.dim() != 4:
        raise ValueError(f"k_low must be (batch, kv_heads, seq, d), got shape {tuple(k_low.shape)}")
    batch, q_heads, head_dim = q.shape
    kb, kv_heads, seq, d = k_low.shape
    if kb != batch:
        raise ValueError(f"shape mismatch: q has batch {batch}, k_low has batch {kb}")
    if d < 1:
        raise ValueError("k_low must have at least one low-rank dimension (d >= 1)")
    if d > head_dim:
        raise ValueError(f"d > D: k_low has d={d} dims but q has head_dim D={head_dim}")
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(f"Hq={q_heads} query heads is not a multiple of Hkv={kv_heads} KV heads")
    if seq < 1:
        raise ValueError("the cache is empty (seq = 0)")
    expected = {
        "k_rest": (batch, kv_heads, seq, head_dim - d),
        "v": (batch, kv_heads, seq, head_dim),
    }
    for name, tensor in (("k_rest", k_rest), ("v", v)):
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"shape mismatch: {name} must be {expected[name]} (from q and k_low), "
                f"got {tuple(tensor.shape)}"
            )
    for name, tensor in (("q", q), ("k_low", k_low), ("k_rest", k_rest), ("v", v)):
        if tensor is None:
            continue
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")
        if tensor.dtype != q.dtype:
            raise ValueError(f"dtype mismatch: q is {q.dtype}, {name} is {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"device mismatch: q is on {q.device}, {name} on {tensor.device}")
    return batch, q_heads, kv_heads, seq, d, head_dim


def unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when its last dim is contiguous (any other strides), else a copy.

    The attention kernel takes batch, head and token strides, so views such as `keys[..., d:]`
    or `k_rest` and `v` sharing one per-token buffer are read in place, not copied every step.
    """
    return tensor if tensor.shape[-1] <= 1 or tensor.stride(-1) == 1 else tensor.contiguous()


def check_k_top(k_top: int, seq: int) -> int:
    if isinstance(k_top, bool) or not isinstance(k_top, int):
        raise ValueError(f"k_top must be an int, got {type(k_top).__name__}")
    if not 1 <= k_top <= seq:
        raise ValueError(f"k_top must be in [1, S={seq}], got {k_top}")
    return k_top


def check_seqlens(seqlens: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> None:
    """seqlens (B,) integer, each in [1, S]. Values are checked on CPU only: on CUDA the check
    would synchronize the device and break CUDA-graph capture of a decode step."""
    if seqlens is None:
        return
    if seqlens.shape != (batch,):
        raise ValueError(f"seqlens must have shape ({batch},), got {tuple(seqlens.shape)}")
    if seqlens.dtype.is_floating_point or seqlens.dtype == torch.bool:
        raise ValueError(f"seqlens must be an integer tensor, got {seqlens.dtype}")
    if seqlens.device != device:
        raise ValueError(f"device mismatch: seqlens is on {seqlens.device}, the cache on {device}")
    if not seqlens.is_cuda and batch > 0:
        low, high = int(seqlens.min()), int(seqlens.max())
        if low < 1 or high > seq:
            raise ValueError(f"seqlens must lie in [1, S={seq}], got values in [{low}, {high}]")


def selected_heads(q_heads: int, kv_heads: int, group_select: bool) -> int:
    """How many index sets a step selects: one per KV group or one per query head."""
    return kv_heads if group_select else q_heads
