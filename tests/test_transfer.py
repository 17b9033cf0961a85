"""Calibration transfer across corpora (moments) and across sequences (kept keys)."""

from __future__ import annotations

import pytest
import torch
from runfolder_fixtures import low_rank_keys, synthetic_run, write_run

from keyspace.analyze.spectra import pca_from_moments, rank_at, second_moment
from keyspace.analyze.transfer import (
    RANK_SPEC,
    across_corpora,
    across_sequences,
    captured_curve,
    moments_of,
    r_specs,
)
from keyspace.errors import KeyspaceError


def subspace_keys(tokens: int, dim: int, rank: int, seed: int) -> torch.Tensor:
    """(tokens, 1, dim) keys in a random `rank`-dim subspace with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))
    x = torch.randn(tokens, rank, generator=gen, dtype=torch.float64) @ basis.T
    return (x + 1e-3 * torch.randn(tokens, dim, generator=gen, dtype=torch.float64)).unsqueeze(1)


def test_captured_curve_on_itself_is_cumulative_ratio():
    m = moments_of(subspace_keys(500, 16, 4, seed=0))
    pca = pca_from_moments(m)
    _, cov = second_moment(m, True)
    curve = captured_curve(pca.components, cov)
    assert torch.allclose(curve, pca.explained_variance_ratio.cumsum(-1), atol=1e-10)
    assert float(curve[0, 0, -1]) == pytest.approx(1.0)


def test_captured_curve_matches_direct_projection():
    a = subspace_keys(400, 16, 3, seed=1)[:, 0]
    b = subspace_keys(400, 16, 5, seed=2)[:, 0]
    pca = pca_from_moments(moments_of(a.unsqueeze(1)))
    _, cov_b = second_moment(moments_of(b.unsqueeze(1)), True)
    curve = captured_curve(pca.components, cov_b)[0, 0]
    centered = b - b.mean(0)
    for r in (1, 3, 8):
        projected = centered @ pca.components[0, 0, :r].T
        expected = float((projected**2).sum() / (centered**2).sum())
        assert float(curve[r - 1]) == pytest.approx(expected, abs=1e-10)


def test_across_corpora_same_vs_different_subspace(tmp_path):
    dim = 16
    same = write_run(
        tmp_path / "a", {k: low_rank_keys(400, 1, 1, dim, [[3]], seed=7) for k in ("pre", "post")}
    )
    again = write_run(
        tmp_path / "b",
        {k: low_rank_keys(400, 1, 1, dim, [[3]], seed=7) * 1.5 for k in ("pre", "post")},
    )
    other = write_run(
        tmp_path / "c", {k: low_rank_keys(400, 1, 1, dim, [[3]], seed=99) for k in ("pre", "post")}
    )
    ct = across_corpora([same, again, other], ["a", "b", "c"])
    assert set(ct.per_head["pre"]) == set(r_specs(dim)) == {RANK_SPEC, "r=2", "r=4", "r=8"}
    m = ct.matrix("pre", RANK_SPEC)  # rows: basis, columns: keys
    assert m.shape == (3, 3)
    assert float(m[0, 0]) >= 0.9 and float(m[0, 1]) > 0.99  # same subspace, scaled
    assert float(m[0, 2]) < 0.6  # a random other 3-dim subspace of 16 dims
    assert float(ct.matrix("post", "r=8")[2, 2]) == pytest.approx(1.0, abs=1e-4)
    doc = ct.to_json()
    assert doc["labels"] == ["a", "b", "c"] and doc["pre"][RANK_SPEC][0][2] == pytest.approx(
        float(m[0, 2])
    )


def test_diagonal_rank_spec_reaches_threshold(tmp_path):
    a = synthetic_run(tmp_path / "a", layers=2, heads=2, head_dim=16, seed=0)
    b = synthetic_run(tmp_path / "b", layers=2, heads=2, head_dim=16, seed=3)
    ct = across_corpora([a, b], ["a", "b"])
    for kind in ("pre", "post"):
        diag = torch.diagonal(ct.per_head[kind][RANK_SPEC][:, :]).permute(2, 0, 1)  # (runs, L, H)
        assert bool((diag >= 0.9 - 1e-9).all())


def test_different_models_refused(tmp_path):
    a = synthetic_run(tmp_path / "a", layers=1, heads=1)
    b = synthetic_run(tmp_path / "b", layers=1, heads=1, model_identity="other/model@1111")
    with pytest.raises(KeyspaceError, match="different models"):
        across_corpora([a, b], ["a", "b"])


def test_sequences_without_kept_keys_says_so(tmp_path):
    run = synthetic_run(tmp_path / "a", layers=1, heads=1, keep_keys=False)
    result = across_sequences(run, "a")
    assert not result.per_layer
    assert any("no kept key shards" in note for note in result.notes)


def test_sequences_stationary_vs_shifted(tmp_path):
    dim, tokens = 16, 512
    stationary = low_rank_keys(tokens, 2, 1, dim, [[3], [3]], seed=4)
    shifted = stationary.clone()
    shifted[:, tokens // 2 :] = low_rank_keys(tokens // 2, 2, 1, dim, [[3], [3]], seed=5)
    good = across_sequences(
        write_run(tmp_path / "s", {"pre": stationary, "post": stationary}, window=64), "s"
    )
    bad = across_sequences(
        write_run(tmp_path / "x", {"pre": shifted, "post": shifted}, window=64), "x"
    )
    assert good.windows_used == 8
    assert good.mean("halves", "pre", RANK_SPEC) > 0.9
    assert good.mean("windows", "post", RANK_SPEC) > 0.9
    assert bad.mean("halves", "pre", RANK_SPEC) < 0.6
    assert bad.mean("windows", "pre", RANK_SPEC) < good.mean("windows", "pre", RANK_SPEC)
    # The random control sees both regimes, so only the window fit suffers from the shift.
    assert (
        abs(good.mean("random", "pre", RANK_SPEC) - good.mean("windows", "pre", RANK_SPEC)) < 0.05
    )
    assert bad.mean("windows", "pre", RANK_SPEC) < bad.mean("random", "pre", RANK_SPEC) - 0.2
    own = rank_at(
        pca_from_moments(moments_of(stationary[0, : tokens // 2])).explained_variance_ratio, 0.9
    )
    assert int(own) == 3
    assert set(good.to_json()["halves"]["pre"]) == set(r_specs(dim))


def test_in_sequence_order_undoes_shard_order():
    from keyspace.analyze.transfer import in_sequence_order

    windows = torch.tensor([2, 2, 0, 0, 1, 1])
    positions = torch.tensor([0, 1, 0, 1, 0, 1])
    keys = (windows * 10 + positions).view(6, 1, 1).double()
    sorted_keys, sorted_windows = in_sequence_order(keys, positions, windows)
    assert sorted_keys.flatten().tolist() == [0, 1, 10, 11, 20, 21]
    assert sorted_windows.tolist() == [0, 0, 1, 1, 2, 2]
