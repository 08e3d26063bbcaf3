"""Drift statistics on synthetic data: PSI, Jensen-Shannon, KS, Holm, ring buffers, windows."""

from __future__ import annotations

import numpy as np
import pytest

from service.export.reference import quantile_edges
from service.monitoring import drift, drift_statistics
from service.monitoring.drift_reference import ModelReference
from service.monitoring.drift_statistics import bin_counts
from service.repository.manifest import FeatureReference, Histogram


def test_psi_is_zero_for_equal_distributions_and_grows_with_shift():
    ref = np.array([100, 200, 300, 400])
    assert drift_statistics.psi(ref, ref * 3) == pytest.approx(0.0, abs=1e-12)
    small = drift_statistics.psi(ref, [110, 190, 310, 390])
    large = drift_statistics.psi(ref, [400, 300, 200, 100])
    assert 0 < small < 0.01 < drift_statistics.PSI_THRESHOLD < large
    # by hand: sum (a - e) ln(a / e) on proportions
    e, a = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    assert drift_statistics.psi([5, 5], [8, 2]) == pytest.approx(float(np.sum((a - e) * np.log(a / e))))


def test_psi_survives_empty_bins():
    assert np.isfinite(drift_statistics.psi([10, 0, 10], [0, 20, 0]))


def test_js_distance_bounds():
    p = np.array([0.25, 0.25, 0.5])
    assert drift_statistics.js_distance(p, p * 400) == pytest.approx(0.0, abs=1e-7)
    assert drift_statistics.js_distance([1, 0], [0, 5]) == pytest.approx(1.0)
    assert 0 < drift_statistics.js_distance(p, [30, 30, 40]) < drift_statistics.JS_THRESHOLD


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert drift_statistics.holm(p).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert drift_statistics.holm([0.9, 0.8]).max() <= 1.0
    assert len(drift_statistics.holm([])) == 0


def test_holm_keeps_false_alarms_rare_across_many_features():
    rng = np.random.default_rng(0)
    raw = rng.uniform(size=(2000, 18))  # 18 features under the null
    any_raw = (raw < 0.01).any(axis=1).mean()
    any_holm = np.mean([(drift_statistics.holm(row) < 0.01).any() for row in raw])
    assert any_raw > 0.1  # uncorrected: about 1 - 0.99^18 = 17% of windows alarm
    assert any_holm <= 0.02


def test_ring_buffer_keeps_the_last_rows_in_order():
    ring = drift.RingBuffer(5, 2)
    ring.extend(np.arange(6).reshape(3, 2))
    assert ring.size == 3 and ring.values()[:, 0].tolist() == [0, 2, 4]
    ring.extend(np.arange(100, 108).reshape(4, 2))  # wraps around
    assert ring.size == 5 and ring.total == 7
    assert ring.values()[:, 0].tolist() == [2, 4, 100, 102, 104, 106][-5:]
    ring.extend(np.arange(20).reshape(10, 2))  # more than the capacity at once
    assert ring.values()[:, 0].tolist() == [10, 12, 14, 16, 18]


def _reference(rng: np.random.Generator, n_features: int = 6) -> tuple[ModelReference, np.ndarray]:
    train = rng.normal(size=(5000, n_features))
    features = tuple(
        FeatureReference(name=f"x_{i}", index=i, histogram=Histogram(
            bin_edges=tuple(quantile_edges(train[:, i])),
            counts=tuple(int(c) for c in bin_counts(train[:, i], quantile_edges(train[:, i])))))
        for i in range(n_features))
    return ModelReference(features, np.full(4, 0.25), np.sort(rng.beta(8, 2, 1000)), 0.1, 500), train


def _window(reference, rows, classes, confidence, disagree):
    window = drift.DriftWindow(reference, 500)
    window.observe(rows, classes, confidence, np.where(disagree, 0.6, 1.0))
    return {s.signal: s for s in window.evaluate(100) if s.signal != "feature"}, window


def test_in_distribution_window_raises_nothing():
    rng = np.random.default_rng(1)
    reference, _ = _reference(rng)
    signals, window = _window(reference, rng.normal(size=(500, 6)), rng.integers(0, 4, 500),
                              rng.beta(8, 2, 500), rng.uniform(size=500) < 0.1)
    assert window.fill == 1.0
    assert not any(s.detected for s in signals.values()), signals
    assert signals["input"].distance < drift_statistics.PSI_THRESHOLD


def test_shifted_window_raises_each_signal():
    rng = np.random.default_rng(2)
    reference, _ = _reference(rng)
    rows = rng.normal(size=(500, 6))
    rows[:, 2] += 1.5
    signals, window = _window(reference, rows, rng.choice(4, 500, p=[0.7, 0.1, 0.1, 0.1]),
                              rng.beta(3, 3, 500), rng.uniform(size=500) < 0.3)
    assert {k for k, s in signals.items() if s.detected} == {"input", "prediction", "confidence", "disagreement"}
    flagged = [s.feature for s in window.evaluate(100) if s.signal == "feature" and s.detected]
    assert flagged == ["x_2"]


def test_too_few_rows_give_no_statistics():
    rng = np.random.default_rng(3)
    reference, _ = _reference(rng)
    window = drift.DriftWindow(reference, 500)
    window.observe(rng.normal(size=(50, 6)), np.zeros(50, dtype=int), np.ones(50), None)
    assert window.evaluate(100) == []
    assert window.fill == 0.1


def test_row_summaries_are_monitored():
    rng = np.random.default_rng(4)
    train = rng.uniform(0, 16, size=(2000, 64))
    summaries = []
    for stat, values in (("row_mean", train.mean(axis=1)), ("row_std", train.std(axis=1))):
        edges = quantile_edges(values)
        summaries.append(FeatureReference(name=stat, statistic=stat, histogram=Histogram(
            bin_edges=tuple(edges), counts=tuple(int(c) for c in bin_counts(values, edges)))))
    reference = ModelReference(tuple(summaries), np.full(2, 0.5), np.linspace(0, 1, 100))
    window = drift.DriftWindow(reference, 300)
    window.observe(rng.uniform(0, 16, size=(300, 64)) * 0.5, np.zeros(300, dtype=int), np.linspace(0, 1, 300), None)
    flags = {s.feature: s.detected for s in window.evaluate(100) if s.signal == "feature"}
    assert flags == {"row_mean": True, "row_std": True}
