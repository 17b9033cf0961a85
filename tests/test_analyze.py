"""The analyzer: PCA from moments against sklearn, ranks, ties, merging, outputs and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from runfolder_fixtures import low_rank_keys, moments_of, synthetic_run, write_run
from sklearn.decomposition import PCA as SkPCA

from keyspace.analyze.pca import (
    AnalyzeConfig,
    analyze_and_write,
    analyze_run,
    is_current,
    parse_thresholds,
)
from keyspace.analyze.spectra import pca_from_moments, rank_at
from keyspace.errors import KeyspaceError
from keyspace.runfolder.analysis import read_calibration
from keyspace.runfolder.store import RunFolder


def test_pca_matches_sklearn_on_stored_keys(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=2, heads=2, head_dim=16, tokens=400)
    folder = RunFolder.open(run)
    analysis = analyze_run(run)
    for kind in ("pre", "post"):
        pca = analysis.kinds[kind].pca
        for layer in range(2):
            keys, _, _ = folder.kept_keys(kind, layer)  # stored float32, as sklearn would see them
            for head in range(2):
                x = keys[:, head].double().numpy()
                sk = SkPCA().fit(x)
                ratios = analysis.kinds[kind].explained_variance_ratio[layer, head].numpy()
                assert abs(ratios - sk.explained_variance_ratio_).max() < 1e-6
                assert torch.allclose(pca.mean[layer, head], torch.from_numpy(sk.mean_), atol=1e-6)
                ev = pca.eigenvalues[layer, head].numpy()
                assert abs(ev - sk.explained_variance_).max() < 1e-6 * ev.max()
                # Components up to sign; only well-separated directions are identifiable.
                ours = pca.components[layer, head].numpy()
                for i in range(2):  # the signal directions; noise ones are near-degenerate
                    cos = abs(float((ours[i] * sk.components_[i]).sum()))
                    assert cos == pytest.approx(1.0, abs=1e-6)


def test_uncentered_uses_raw_second_moment():
    keys = low_rank_keys(300, 1, 1, 8, [[3]], seed=3)
    pca = pca_from_moments(moments_of(keys), centered=False)
    x = keys[0, :, 0]
    expected = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).flip(0)
    assert torch.allclose(pca.eigenvalues[0, 0], expected, atol=1e-10)
    assert torch.count_nonzero(pca.mean) == 0


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_synthetic_subspace_gives_its_rank(rank):
    # Equal scales inside the subspace: rank@0.9 must be exactly r, not r - 1.
    gen = torch.Generator().manual_seed(rank)
    basis, _ = torch.linalg.qr(torch.randn(32, rank, generator=gen, dtype=torch.float64))
    x = torch.randn(4000, rank, generator=gen, dtype=torch.float64) @ basis.T
    x = x + 1e-3 * torch.randn(4000, 32, generator=gen, dtype=torch.float64)
    ratios = pca_from_moments(moments_of(x.view(1, 4000, 1, 32))).explained_variance_ratio
    assert int(rank_at(ratios, 0.9)[0, 0]) == rank
    assert int(rank_at(ratios, 0.99)[0, 0]) == rank


def test_rank_at_tie_exactly_at_threshold_counts():
    ratios = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)  # exact binary fractions
    assert int(rank_at(ratios, 0.75)) == 2  # cumulative 0.75 == τ: rank 2, not 3
    assert int(rank_at(ratios, 0.7500001)) == 3
    assert int(rank_at(ratios, 0.5)) == 1
    assert int(rank_at(ratios, 1.0)) == 4


def test_rank_at_tolerates_float_rounding_below_threshold():
    ratios = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    assert float(ratios[:2].sum()) < 0.9  # 0.8999999999999999 in float64
    assert int(rank_at(ratios, 0.9)) == 2
    assert int(rank_at(torch.tensor([0.7, 0.2 - 1e-6, 0.1 + 1e-6], dtype=torch.float64), 0.9)) == 3


def test_rank_at_zero_variance_head_is_zero():
    assert int(rank_at(torch.zeros(4, dtype=torch.float64), 0.9)) == 0


def test_merged_halves_equal_whole():
    keys = low_rank_keys(600, 2, 2, 8, [[2, 3], [4, 5]], seed=1)
    whole = moments_of(keys)
    merged = moments_of(keys[:, :300]).merge(moments_of(keys[:, 300:]))
    assert torch.allclose(merged.outer, whole.outer, rtol=1e-12, atol=1e-9)
    a, b = pca_from_moments(whole), pca_from_moments(merged)
    assert torch.allclose(a.explained_variance_ratio, b.explained_variance_ratio, atol=1e-12)
    assert torch.equal(
        rank_at(a.explained_variance_ratio, 0.9), rank_at(b.explained_variance_ratio, 0.9)
    )


def test_outputs_written_and_consistent(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=3, heads=2, head_dim=16)
    analysis = analyze_and_write(run, AnalyzeConfig((0.8, 0.95)))
    doc = json.loads((run / "ranks.json").read_text())
    assert doc["thresholds"] == [0.8, 0.9, 0.95]  # 0.9 is always written: validate reads it
    assert (doc["head_dim"], doc["num_layers"], doc["num_kv_heads"], doc["centered"]) == (
        16,
        3,
        2,
        True,
    )
    for kind in ("pre", "post"):
        ranks = doc[kind]["rank_at"]["0.9"]
        assert ranks == analysis.kinds[kind].ranks[0.9].tolist()
        assert len(ranks) == 3 and len(ranks[0]) == 2
        flat = [r for row in ranks for r in row]
        summary = doc[kind]["summary"]["0.9"]
        assert summary["mean"] == pytest.approx(sum(flat) / len(flat))
        assert (summary["min"], summary["max"]) == (min(flat), max(flat))
        assert summary["mean_fraction"] == pytest.approx(summary["mean"] / 16)
        evr = doc[kind]["explained_variance_ratio"]
        assert len(evr) == 3 and len(evr[0]) == 2 and len(evr[0][0]) == 16
        assert sum(evr[1][1]) == pytest.approx(1.0)
    # Pre ranks of the fixture are 2 + (layer + head) % 4.
    assert doc["pre"]["rank_at"]["0.9"] == [[2, 3], [3, 4], [4, 5]]
    cal = read_calibration(run)
    assert cal.metadata["model_identity"] == "test/tiny-llama@0000"
    assert cal.metadata["centered"] == "true" and cal.metadata["tokens"] == "512"
    assert cal.components["post"].shape == (3, 2, 16, 16)
    eig = cal.eigenvalues["pre"]
    assert bool((eig[..., :-1] >= eig[..., 1:]).all())
    comps = cal.components["pre"][1, 1].double()
    assert torch.allclose(comps @ comps.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
    assert is_current(run, AnalyzeConfig((0.9,)))
    assert not is_current(run, AnalyzeConfig((0.9,), centered=False))


def test_uncentered_recorded(tmp_path):
    run = synthetic_run(tmp_path / "run", layers=1, heads=1)
    analyze_and_write(run, AnalyzeConfig(centered=False))
    assert json.loads((run / "ranks.json").read_text())["centered"] is False
    assert read_calibration(run).metadata["centered"] == "false"


@pytest.mark.parametrize("text", ["0", "1.5", "-0.1", "nan", "0.9,abc", ""])
def test_bad_thresholds_refused(text):
    with pytest.raises(KeyspaceError):
        parse_thresholds(text)


def test_thresholds_parse_and_sort():
    assert parse_thresholds("0.95, 0.8,0.9,1") == (0.8, 0.9, 0.95, 1.0)


def test_partial_and_missing_runs_refused(tmp_path):
    with pytest.raises(KeyspaceError, match="does not exist"):
        analyze_run(tmp_path / "nope")
    run = synthetic_run(tmp_path / "partial", layers=1, heads=1, state="partial")
    with pytest.raises(KeyspaceError, match="partial"):
        analyze_run(run)


def test_token_count_warn_and_refuse(tmp_path):
    keys = {k: low_rank_keys(100, 1, 1, 16, [[3]], seed=2) for k in ("pre", "post")}
    analysis = analyze_run(write_run(tmp_path / "few", keys))
    assert any("100 tokens" in w for w in analysis.warnings)
    keys = {k: low_rank_keys(10, 1, 1, 16, [[3]], seed=2) for k in ("pre", "post")}
    with pytest.raises(KeyspaceError, match="fewer than head_dim"):
        analyze_run(write_run(tmp_path / "tiny", keys))


def test_single_threaded_restores_thread_count():
    from keyspace.analyze.spectra import single_threaded

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), single_threaded():
        assert torch.get_num_threads() == 1
        raise RuntimeError("body failed")
    assert torch.get_num_threads() == before


def test_analyze_refuses_to_write_a_nan_calibration(tmp_path, monkeypatch):
    """Whatever produced it, a calibration that is not finite is never written."""
    from keyspace.analyze import pca

    run = synthetic_run(tmp_path / "run", layers=2, heads=2)
    real = pca.calibration_of

    def with_nan(analysis):
        calibration = real(analysis)
        calibration.components["post"][1, 0, 2, 3] = float("nan")
        return calibration

    monkeypatch.setattr(pca, "calibration_of", with_nan)
    with pytest.raises(KeyspaceError, match=r"post.components of layer 1, KV head 0"):
        analyze_and_write(run)
    assert not (run / "ranks.json").exists() and not list(run.glob("calibration*"))
