"""Drift reference: every training row counted, increasing edges, the feature cap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.export import reference as ref
from service.repository.manifest import DriftReference, load_manifest

MODELS = Path(__file__).resolve().parents[2] / "models"
VARIANTS = sorted(p.parent.parent.name for p in MODELS.glob("*/1/variant.json"))


def _assert_histograms_count_all(drift: DriftReference, n: int) -> None:
    for h in [f.histogram for f in drift.features] + [drift.confidence]:
        assert sum(h.counts) == n
        assert all(np.diff(h.bin_edges) > 0)


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    n, d = 700, 40
    x = rng.normal(0.0, 1.0, size=(n, d)) * np.linspace(0.1, 4.0, d)  # variance grows with index
    x[:, 5] = 2.0                                          # constant feature
    x[:, 7] = np.where(rng.random(n) < 0.9, 0.0, 16.0)    # sparse, like a digits pixel
    logits = rng.normal(0.0, 2.0, size=(n, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return x, probs


def test_reference_counts_every_row_and_caps_features(synthetic) -> None:
    x, probs = synthetic
    drift = ref.build_reference(x, probs, input_name="x", max_features=5, sample_size=300, seed=1)
    _assert_histograms_count_all(drift, len(x))
    values = [f for f in drift.features if f.statistic == "value"]
    assert len(values) == 5
    # The highest-variance features, the sparse one (variance ~23) among them.
    assert [f.index for f in values] == sorted(np.argsort(-x.var(axis=0))[:5].tolist())
    assert 7 in [f.index for f in values]
    assert [f.name for f in values][0] == "x_7"
    # More features than the cap: per-row summaries are added.
    assert [f.statistic for f in drift.features[5:]] == ["row_mean", "row_std"]
    assert drift.n == len(x)
    assert sum(drift.predicted_class_frequencies) == pytest.approx(1.0)
    assert len(drift.confidence.counts) == ref.CONFIDENCE_BINS
    assert drift.confidence.bin_edges[0] == 0.0 and drift.confidence.bin_edges[-1] == 1.0
    assert len(drift.confidence_sample) == 300
    assert set(drift.confidence_sample) <= set(probs.max(axis=1).tolist())


def test_reference_is_deterministic_and_small_inputs_get_no_row_summaries(synthetic) -> None:
    x, probs = synthetic
    a = ref.build_reference(x[:, :10], probs, seed=2)
    b = ref.build_reference(x[:, :10], probs, seed=2)
    assert a == b
    assert all(f.statistic == "value" for f in a.features)
    assert 5 not in [f.index for f in a.features]  # constant: nothing to monitor
    assert len(a.confidence_sample) == len(x)      # fewer rows than the sample size


def test_quantile_edges_dedup_and_outer_edges() -> None:
    sparse = np.array([0.0] * 90 + [3.0] * 5 + [16.0] * 5)
    edges = ref.quantile_edges(sparse)
    assert edges[0] == 0.0 and edges[-1] == 16.0
    assert all(np.diff(edges) > 0)
    assert sum(ref.bin_counts(sparse, edges)) == len(sparse)
    np.testing.assert_array_equal(ref.quantile_edges(np.full(10, 4.0)), [3.5, 4.5])


def test_bin_counts_clip_out_of_range_values() -> None:
    edges = np.array([0.0, 1.0, 2.0])
    np.testing.assert_array_equal(ref.bin_counts(np.array([-5.0, 0.5, 1.0, 2.0, 9.0]), edges), [2, 3])


@pytest.mark.parametrize("name", VARIANTS)
def test_bundled_reference(name: str) -> None:
    manifest = load_manifest(MODELS / name / "1")
    drift = manifest.drift_reference
    train_n = len(json.loads((MODELS / "digits_split.json").read_text())["train"])
    assert drift.n == manifest.provenance.train_n == train_n
    _assert_histograms_count_all(drift, train_n)
    assert sum(f.statistic == "value" for f in drift.features) <= ref.MAX_FEATURES
    assert {"row_mean", "row_std"} <= {f.statistic for f in drift.features}
    assert len(drift.predicted_class_frequencies) == manifest.num_classes
    assert len(drift.confidence_sample) == min(ref.SAMPLE_SIZE, train_n)
