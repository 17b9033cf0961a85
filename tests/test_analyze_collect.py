"""The analyzer on a run folder written by the real collector (tiny random Llama), not a fixture."""

from __future__ import annotations

import pytest
import torch
from sklearn.decomposition import PCA as SkPCA
from tiny_models import save_tiny_model, write_corpus

from keyspace.analyze.pca import AnalyzeConfig, analyze_and_write, is_current
from keyspace.collect.runner import CollectConfig, collect
from keyspace.reports.build import build_report
from keyspace.runfolder.store import RunFolder

WINDOW = 32


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("collected")
    model = save_tiny_model(root / "tiny-llama")
    corpus = write_corpus(root / "corpus.txt")
    cfg = CollectConfig(
        model=str(model), dataset=str(corpus), out=root / "run", window=WINDOW,
        max_tokens=WINDOW * 12, keep_keys="all", shard_windows=3,
    )  # fmt: skip
    return collect(cfg).out


def test_analysis_of_collected_run_matches_sklearn(collected):
    analysis = analyze_and_write(collected, AnalyzeConfig((0.9,)))
    run = RunFolder.open(collected)
    layers, heads, _ = run.shape
    assert analysis.tokens == WINDOW * 12
    for kind in ("pre", "post"):
        for layer in range(layers):
            keys, _, _ = run.kept_keys(kind, layer)
            for head in range(heads):
                sk = SkPCA().fit(keys[:, head].double().numpy())
                ours = analysis.kinds[kind].explained_variance_ratio[layer, head].numpy()
                assert abs(ours - sk.explained_variance_ratio_).max() < 1e-6
    assert is_current(collected, AnalyzeConfig((0.9,)))


def test_report_on_collected_run(collected, tmp_path):
    report = build_report([collected], tmp_path / "report", AnalyzeConfig((0.9,)))
    assert report.index is not None and report.index.is_file()
    seq = report.sequence_transfer[0]
    assert seq.windows_used >= 2 and {"halves", "windows", "random"} <= set(seq.per_layer)
    value = seq.per_layer["halves"]["post"]["r=8"]
    assert bool(((value >= 0) & (value <= 1 + 1e-9)).all())
    assert torch.isfinite(value).all()
