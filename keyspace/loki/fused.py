"""Fused input projections for the decode loop: q/k/v as one GEMM, gate/up as another (gpt-fast's
recipe), without rewriting transformers' attention or MLP forward.

At M = batch rows a decode step's GEMMs are skinny, and a Llama layer runs seven of them; the k and
v projections (N = Hkv · D) fill few SMs. Inside `fused_projections(model)`:
- each fused group (the architecture row's `qkv` and `gate_up`, when they name several modules)
  gets one weight `[W_q; W_k; W_v]` (biases likewise); the original Parameters become views of it,
  so the fused weight takes the originals' place in memory instead of doubling it;
- the attention (MLP) module is wrapped in `FusedInput`, which hands it the fused projection's
  output in place of its input, and its projections are swapped for `ProjectionSlice`s, each
  returning its own columns of that output. transformers' forward reads its input only through the
  projections and for its leading shape (B, T), so it runs unchanged.
On exit every module is put back and each Parameter gets its own storage again (a copy of its
view): state_dict and module types are bit-identical, also when the body raised.

Phi3 (qkv_proj, gate_up_proj) and GPT-NeoX (query_key_value; an ungated MLP) are fused already:
their rows name one projection per group, and nothing is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from keyspace.models.arch import arch_spec, decoder_layers


class ProjectionSlice(torch.nn.Module):
    """Stands in for one projection of a fused group: its columns [start, stop) of the fused output."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return fused[..., self.start : self.stop]  # a view: no copy

    def extra_repr(self) -> str:
        return f"start={self.start}, stop={self.stop}"


class FusedInput(torch.nn.Module):
    """Runs `inner` (an attention or MLP module) on `hidden_states @ weight.T + bias`, the fused
    projection of its input; weight (sum of the group's out features, in features)."""

    def __init__(self, inner: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.inner(F.linear(hidden_states, self.weight, self.bias), *args, **kwargs)


def _linears(inner: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Linear]:
    linears = [getattr(inner, name, None) for name in names]
    if not all(isinstance(m, torch.nn.Linear) for m in linears):
        raise ValueError(
            f"{type(inner).__name__} has no nn.Linear at each of {names}: cannot fuse them "
            "(fix the architecture row in keyspace/models/arch.py, or fuse_projections=False)"
        )
    if len({(m.in_features, m.weight.dtype, m.weight.device) for m in linears}) != 1:
        raise ValueError(f"the projections {names} differ in input size, dtype or device")
    return linears


def _fused_bias(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    parts = [
        m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach() for m in linears
    ]
    return torch.cat(parts)


def _fuse(owner: torch.nn.Module, slot: str, names: tuple[str, ...]) -> Callable[[], None]:
    """Fuse the projections `names` of `owner.<slot>`; return the function that undoes it."""
    inner = getattr(owner, slot)
    linears = _linears(inner, names)
    sizes = [m.out_features for m in linears]
    weight = torch.cat([m.weight.detach() for m in linears])  # [sum(out), in]
    bias = _fused_bias(linears)
    fused = FusedInput(inner, weight, bias)
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    for m, w in zip(linears, weight.split(sizes), strict=True):
        m.weight.data = w  # the originals now live inside the fused weight
    if bias is not None:
        for m, b in zip(linears, bias.split(sizes), strict=True):
            if m.bias is not None:
                m.bias.data = b
    for i, name in enumerate(names):
        setattr(inner, name, ProjectionSlice(bounds[i], bounds[i + 1]))
    setattr(owner, slot, fused)

    def undo() -> None:
        setattr(owner, slot, inner)
        for name, m in zip(names, linears, strict=True):
            setattr(inner, name, m)
            m.weight.data = m.weight.data.clone()
            if m.bias is not None:
                m.bias.data = m.bias.data.clone()

    return undo


def fusion_groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, tuple[str, ...]]]:
    """(decoder layer, attribute of its attention or MLP, projection names) of every group of
    several projections that the architecture row says read the same input."""
    spec = arch_spec(model.config)
    groups = []
    for layer in decoder_layers(model):
        for slot, names in ((spec.attention, spec.qkv), (spec.mlp, spec.gate_up)):
            if len(names) > 1:
                groups.append((layer, slot, names))
    return groups


@contextlib.contextmanager
def fused_projections(model: torch.nn.Module) -> Iterator[int]:
    """Run `model` with its q/k/v and gate/up projections fused (yields how many groups); the
    model is restored exactly on exit, also on error."""
    undo: list[Callable[[], None]] = []
    try:
        with torch.no_grad():
            for owner, slot, names in fusion_groups(model):
                undo.append(_fuse(owner, slot, names))
        yield len(undo)
    finally:
        with torch.no_grad():
            for step in reversed(undo):
                step()
