"""The query and score spectra, and the query-aware transforms, against independent computations.

Notation (keyspace.analyze.spectra): per KV head, C_k is the centered key covariance, S_q = E[q qᵀ] the
uncentered second moment of the group's queries, U the descending eigenvectors of
S_q^½ C_k S_q^½, A = Uᵀ S_q^½ the key transform and B = Uᵀ S_q^-½ the query transform.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from runfolder_fixtures import low_rank_keys, moments_of, write_run

from keyspace.analyze.pca import AnalyzeConfig, analyze_and_write, analyze_run, is_current
from keyspace.analyze.spectra import QUERY_EIGEN_FLOOR, score_spectrum
from keyspace.errors import KeyspaceError
from keyspace.runfolder.analysis import read_calibration
from keyspace.runfolder.store import (
    KINDS,
    RunFolder,
    query_kind,
    save_moments,
    write_manifest,
)

F64 = torch.float64


def anisotropic(samples: int, layers: int, heads: int, dim: int, seed: int, decay: float = 0.8):
    """Vectors (layers, samples, heads, dim) with a random rotation of a geometric spectrum and a
    nonzero mean: what a head's queries or keys roughly look like."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(layers, samples, heads, dim, dtype=F64)
    scales = decay ** torch.arange(dim, dtype=F64)
    for layer in range(layers):
        for head in range(heads):
            basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
            coeffs = torch.randn(samples, dim, generator=gen, dtype=F64) * scales
            mean = 0.5 * torch.randn(dim, generator=gen, dtype=F64)
            out[layer, :, head] = coeffs @ basis.T + mean
    return out


def query_run(path: Path, keys: dict, queries: dict, **kwargs) -> Path:
    """A run folder (runfolder_fixtures.write_run) whose moments also hold query moments, as
    `collect --capture keys,queries` writes them. queries[kind]: (layers, n, kv_heads, D),
    already pooled per KV head."""
    write_run(path, keys, **kwargs)
    run = RunFolder.open(path)
    moments = {kind: run.moments(kind) for kind in KINDS}
    for kind in KINDS:
        moments[query_kind(kind)] = moments_of(queries[kind])
    sha256 = save_moments(path / "moments.safetensors", moments)
    write_manifest(path, replace(run.manifest, moments_sha256=sha256, capture=("keys", "queries")))
    return path


def synthetic_query_run(path: Path, layers: int = 2, heads: int = 2, dim: int = 16) -> Path:
    keys = {
        kind: anisotropic(600, layers, heads, dim, seed=i, decay=0.85)
        for i, kind in enumerate(KINDS)
    }
    queries = {
        kind: anisotropic(900, layers, heads, dim, seed=10 + i, decay=0.6)
        for i, kind in enumerate(KINDS)
    }
    return query_run(path, keys, queries)


def _numpy_spectra(q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, ...]:
    """(S_q eigenvalues, score eigenvalues, score eigenvectors as columns, S_q^½), descending,
    by numpy's general `eig` (not torch, not eigh): q (n, D), k (m, D)."""
    s_q = q.T @ q / len(q)
    c_k = np.cov(k, rowvar=False)  # centered, unbiased
    lam, vec = np.linalg.eig(s_q)
    lam, vec = lam.real, vec.real
    root = vec @ np.diag(np.sqrt(np.clip(lam, 0, None))) @ np.linalg.inv(vec)
    mu, u = np.linalg.eig(root @ c_k @ root)
    order = np.argsort(-mu.real)
    return np.sort(lam)[::-1], mu.real[order], u.real[:, order], root


def test_spectra_match_numpy_eig():
    keys = anisotropic(700, 1, 2, 12, seed=1, decay=0.85)
    queries = anisotropic(800, 1, 2, 12, seed=2, decay=0.7)
    spectrum = score_spectrum(moments_of(keys), moments_of(queries))
    for head in range(2):
        q, k = queries[0, :, head].numpy(), keys[0, :, head].numpy()
        lam, mu, u, root = _numpy_spectra(q, k)
        np.testing.assert_allclose(spectrum.query_eigenvalues[0, head], lam, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(spectrum.eigenvalues[0, head], mu, rtol=1e-8, atol=1e-12)
        # U's rows are the whitened matrix's eigenvectors, up to sign: U = A S_q^-½.
        u_rows = spectrum.key_transform[0, head].numpy() @ np.linalg.inv(root)
        for i in range(3):  # the well-separated leading directions
            cos = abs(float(u_rows[i] @ u[:, i])) / np.linalg.norm(u[:, i])
            assert cos == pytest.approx(1.0, abs=1e-7)


def test_transforms_keep_every_score():
    """B = A⁻ᵀ, so (B q)·(A k) = q·k for any q and k: in float64 exactly, and in the float32
    calibration file within float32 rounding."""
    keys = anisotropic(500, 2, 2, 16, seed=3)
    queries = anisotropic(500, 2, 2, 16, seed=4, decay=0.5)  # ill-conditioned S_q
    spectrum = score_spectrum(moments_of(keys), moments_of(queries))
    a, b = spectrum.key_transform, spectrum.query_transform
    eye = torch.eye(16, dtype=F64).expand_as(a)
    torch.testing.assert_close(a @ b.transpose(-1, -2), eye, rtol=0, atol=1e-9)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 16, 7, generator=gen, dtype=F64)  # columns are vectors
    k = torch.randn(2, 2, 16, 9, generator=gen, dtype=F64)
    exact = q.transpose(-1, -2) @ k
    torch.testing.assert_close((b @ q).transpose(-1, -2) @ (a @ k), exact, rtol=1e-9, atol=1e-9)
    a32, b32 = a.float(), b.float()
    got = (b32 @ q.float()).transpose(-1, -2) @ (a32 @ k.float())
    assert float((got.double() - exact).abs().max()) < 1e-4 * float(exact.abs().max())


def _captured(q: torch.Tensor, kc: torch.Tensor, w: torch.Tensor) -> float:
    """Score energy a bilinear approximation ŝ = qᵀ W k̄ explains, over every (query, key) pair:
    mean(s²) − mean((s − ŝ)²), with s = q·k̄ and k̄ = k − mean(k). q (n, D), kc (m, D) centered."""
    s = q @ kc.T
    return float((s**2).mean() - ((s - q @ w @ kc.T) ** 2).mean())


def test_first_d_coordinates_hold_the_most_score_energy():
    """Brute force over the sample itself: the explained score energy
        E(W) = mean over all (q, k) pairs of s² − (s − ŝ)²,  s = q·(k − μ),  ŝ = qᵀ W (k − μ),
    where W = B[:d]ᵀ A[:d] is what scoring with the first d query-aware coordinates computes
    (q̃[:d]·k̃[:d] = qᵀ B[:d]ᵀ A[:d] k), is at least that of every rank-d W we try: random
    orthogonal projections (one basis for q and k, as Loki), truncations of random invertible
    transforms T (q with T⁻ᵀ, k with T), and the keys' own top-d PCA basis (Loki itself).
    For our W, E(W) also equals mean(ŝ²) = mean((q̃[:d]·k̃[:d])²): the residual is orthogonal,
    and its share of the total is the cumulative score spectrum at d."""
    dim, d = 12, 3
    keys = anisotropic(400, 1, 1, dim, seed=7, decay=0.85)
    queries = anisotropic(300, 1, 1, dim, seed=8, decay=0.7)
    spectrum = score_spectrum(moments_of(keys), moments_of(queries))
    q, k = queries[0, :, 0], keys[0, :, 0]
    kc = k - k.mean(0)
    a, b = spectrum.key_transform[0, 0], spectrum.query_transform[0, 0]
    ours_w = b[:d].T @ a[:d]
    ours = _captured(q, kc, ours_w)
    total = float(((q @ kc.T) ** 2).mean())
    assert ours == pytest.approx(float(((q @ ours_w @ kc.T) ** 2).mean()), rel=1e-9)
    assert ours / total == pytest.approx(float(spectrum.score_ratio[0, 0, :d].sum()), rel=1e-9)
    gen = torch.Generator().manual_seed(9)
    rivals = []
    for _ in range(300):
        v, _ = torch.linalg.qr(torch.randn(dim, d, generator=gen, dtype=F64))
        rivals.append(v @ v.T)
        t = torch.randn(dim, dim, generator=gen, dtype=F64) + 2 * torch.eye(dim, dtype=F64)
        rivals.append(torch.linalg.inv(t).T[:d].T @ t[:d])
    pca = torch.linalg.eigh(torch.cov(kc.T)).eigenvectors.flip(-1)[:, :d]
    rivals.append(pca @ pca.T)
    best_rival = max(_captured(q, kc, w) for w in rivals)
    assert best_rival <= ours + 1e-9 * total
    assert _captured(q, kc, rivals[-1]) < 0.99 * ours  # Loki's key basis is beaten here


def test_small_query_eigenvalues_are_floored():
    """Queries confined to 5 of 12 dimensions: S_q is singular, 7 eigenvalues are raised to the
    floor, the transforms stay finite and exact, and the key RMS estimate matches the keys."""
    dim = 12
    gen = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(dim, 5, generator=gen, dtype=F64))
    queries = (torch.randn(600, 5, generator=gen, dtype=F64) @ basis.T).view(1, 600, 1, dim)
    keys = anisotropic(600, 1, 1, dim, seed=12)
    spectrum = score_spectrum(moments_of(keys), moments_of(queries))
    assert int(spectrum.clamped[0, 0]) == dim - 5
    a, b = spectrum.key_transform[0, 0], spectrum.query_transform[0, 0]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a @ b.T, torch.eye(dim, dtype=F64), rtol=0, atol=1e-8)
    # cond(A) = cond(S_q^½): the floor caps it at 1/√floor instead of infinity.
    assert float(torch.linalg.cond(a)) == pytest.approx(QUERY_EIGEN_FLOOR**-0.5, rel=1e-6)
    transformed = keys[0, :, 0] @ a.T  # k̃ = A k per key
    rms = transformed.pow(2).mean(0).sqrt()
    torch.testing.assert_close(spectrum.key_rms[0, 0], rms, rtol=2e-3, atol=1e-12)  # n/(n-1)
    assert float(spectrum.query_rms[0, 0].max()) == pytest.approx(1.0, abs=1e-6)


def test_analyze_writes_query_and_score_spectra(tmp_path):
    run = synthetic_query_run(tmp_path / "run")
    analysis = analyze_and_write(run, AnalyzeConfig((0.8, 0.9)))
    assert analysis.has_queries
    doc = json.loads((run / "ranks.json").read_text())
    assert doc["queries"] is True and doc["query_eigen_floor"] == QUERY_EIGEN_FLOOR
    for kind in KINDS:
        ka, part = analysis.kinds[kind], doc[kind]
        for name, spectrum in (("query", ka.query), ("score", ka.score)):
            assert part[f"{name}_rank_at"]["0.9"] == spectrum.ranks[0.9].tolist()
            assert set(part[f"{name}_rank_at"]) == {"0.8", "0.9"}
            flat = [r for row in part[f"{name}_rank_at"]["0.9"] for r in row]
            assert part[f"{name}_summary"]["0.9"]["mean"] == pytest.approx(sum(flat) / len(flat))
            ratios = part[f"{name}_explained_variance_ratio"]
            assert len(ratios) == 2 and len(ratios[0][0]) == 16
            assert sum(ratios[1][1]) == pytest.approx(1.0)
        assert part["rank_at"]["0.9"] == ka.ranks[0.9].tolist()  # the key fields are unchanged
        rms = ka.scores.key_rms.amax(-1)
        assert part["score_key_rms_max"] == rms.tolist()
        assert part["score_range"]["key_rms_max"] == pytest.approx(float(rms.max()))
        assert part["score_range"]["key_fp16_headroom"] == pytest.approx(65504 / float(rms.max()))
        # Queries weigh key directions unevenly here: fewer score dimensions than key ones.
        assert ka.score.summary[0.9].mean < ka.summary[0.9].mean
    calibration = read_calibration(run)
    assert calibration.metadata["queries"] == "true"
    assert float(calibration.metadata["query_eigen_floor"]) == QUERY_EIGEN_FLOOR
    for kind in KINDS:
        a, b = calibration.score_transforms(kind)
        assert a.shape == b.shape == (2, 2, 16, 16) and a.dtype == b.dtype == torch.float32
        expected = analysis.kinds[kind].scores
        torch.testing.assert_close(a, expected.key_transform.float())
        torch.testing.assert_close(b, expected.query_transform.float())
        assert calibration.score_eigenvalues[kind].shape == (2, 2, 16)
        comps = calibration.components[kind].double()  # the key basis: orthonormal as before
        eye = torch.eye(16, dtype=F64).expand_as(comps)
        torch.testing.assert_close(comps @ comps.transpose(-1, -2), eye, rtol=0, atol=1e-5)
    assert is_current(run, AnalyzeConfig((0.8, 0.9)))


def test_keys_only_run_analyzes_and_says_what_it_lacks(tmp_path):
    keys = {k: low_rank_keys(400, 2, 2, 16, [[2, 3], [4, 5]], seed=i) for i, k in enumerate(KINDS)}
    run = write_run(tmp_path / "old", keys)
    analysis = analyze_and_write(run)
    assert not analysis.has_queries and analysis.kinds["post"].score is None
    doc = json.loads((run / "ranks.json").read_text())
    assert doc["queries"] is False
    assert not [key for key in doc["post"] if key.startswith(("query", "score"))]
    assert read_calibration(run).metadata["queries"] == "false"
    assert is_current(run, AnalyzeConfig())
    with pytest.raises(KeyspaceError, match="without queries") as err:
        read_calibration(run).score_transforms("post")
    assert "--capture keys,queries" in err.value.hint and "keyspace analyze" in err.value.hint


def test_an_analysis_without_score_fields_is_stale_for_a_run_with_queries(tmp_path):
    """A run with queries whose ranks.json predates them (no `queries` field) is re-analyzed."""
    from keyspace.analyze.pca import write_ranks
    from keyspace.runfolder.analysis import read_ranks

    run = synthetic_query_run(tmp_path / "run", layers=1, heads=1)
    analyze_and_write(run)
    doc = read_ranks(run)
    doc.pop("queries")
    write_ranks(run, doc)
    assert not is_current(run, AnalyzeConfig())


def test_collected_run_has_exact_query_aware_scores(tmp_path):
    """End to end on the tiny GQA Llama: collect keys and queries, analyze, and the float32
    transforms reproduce the model's post-RoPE scores q·k of every query head."""
    from tiny_models import save_tiny_model, write_corpus

    from keyspace.collect.capture import capture_keys
    from keyspace.collect.runner import CollectConfig, collect
    from keyspace.models.loading import load_model

    model_dir = save_tiny_model(tmp_path / "tiny-llama")
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = CollectConfig(
        model=str(model_dir), dataset=str(corpus), out=tmp_path / "run", window=32,
        max_tokens=32 * 8, keep_keys="none",
    )  # fmt: skip
    analysis = analyze_run(collect(cfg).out)
    assert analysis.has_queries and analysis.kinds["post"].score.ranks[0.9].shape == (2, 2)
    model = load_model(str(model_dir)).model
    got = {}
    with (
        torch.no_grad(),
        capture_keys(
            model,
            lambda kind, layer, x: got.__setitem__(("k", kind, layer), x[0].double()),
            lambda kind, layer, x: got.__setitem__(("q", kind, layer), x[0].double()),
        ),
    ):
        model(torch.randint(0, 300, (1, 20)))
    for layer in range(2):
        a, b = (t.double() for t in analysis_transforms(analysis, layer))
        q, k = got[("q", "post", layer)], got[("k", "post", layer)]  # (T, 4, D), (T, 2, D)
        for head in range(4):
            j = head // 2
            exact = q[:, head] @ k[:, j].T
            rotated = (q[:, head] @ b[j].T) @ (k[:, j] @ a[j].T).T
            assert float((rotated - exact).abs().max()) < 1e-4 * float(exact.abs().max())


def analysis_transforms(analysis, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = analysis.kinds["post"].scores
    return scores.key_transform[layer].float(), scores.query_transform[layer].float()
