"""The study script benchmarks/basis_sparq.py: its selection against two independent references."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from loki_fixtures import random_bases

from keyspace.loki import METHODS, get_method
from keyspace.loki.masked import causal_mask
from keyspace.loki.methods import LayerInputs

exact_topk, sparq = get_method("exact-topk").select, get_method("sparq").select


def study():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "basis_sparq.py"
    spec = importlib.util.spec_from_file_location("basis_sparq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(basis, d: int) -> LayerInputs:
    gen = torch.Generator().manual_seed(2)
    query, key = torch.randn(1, 2, 12, 16, generator=gen), torch.randn(1, 2, 12, 16, generator=gen)
    return LayerInputs(
        query=query, key=key, scale=0.25, causal=causal_mask(12, 12, query.device),
        budget=torch.full((12,), 4), basis=basis, dims=torch.full((2,), d),
    )  # fmt: skip


def test_in_the_identity_basis_it_is_sparq():
    identity = torch.eye(16).expand(2, 16, 16).contiguous()
    got = study().basis_sparq(inputs(identity, 5))
    assert torch.equal(torch.isinf(got), torch.isinf(sparq(inputs(identity, 5))))


def test_at_full_rank_in_an_orthonormal_basis_it_is_exact_top_k():
    basis = random_bases(1, 2, seed=3)[0]  # (heads, D, D), orthonormal rows
    got = study().basis_sparq(inputs(basis, 16))
    expected = exact_topk(inputs(basis, 16))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.isfinite(got).sum() == 2 * sum(min(4, i + 1) for i in range(12))
    # and below full rank it is a different selection, so the two checks above are not vacuous
    assert not torch.equal(
        torch.isinf(study().basis_sparq(inputs(basis, 3))), torch.isinf(expected)
    )


def test_it_is_loki_adaptive_without_key_scales():
    basis = random_bases(1, 2, seed=3)[0]
    got = study().basis_sparq(inputs(basis, 5))
    adaptive = get_method("loki-adaptive").select(inputs(basis, 5))
    assert torch.equal(torch.isinf(got), torch.isinf(adaptive))


def test_the_study_method_is_registered_by_main_only():
    module = study()
    assert module.BASIS_SPARQ.name == "basis-sparq" and "basis-sparq" not in METHODS
