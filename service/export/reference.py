"""The drift reference: training-split distributions that live traffic is compared with.

Features are binned on the raw inputs (what the server receives, before normalisation);
confidences are the calibrated max-probabilities (what the server computes). Bin edges are
fixed here, so the server only counts live values into them (see `bin_counts`).
"""

from __future__ import annotations

import numpy as np

from service.monitoring.drift_statistics import bin_counts
from service.repository.manifest import DriftReference, FeatureReference, Histogram

FEATURE_BINS = 10
MAX_FEATURES = 16
CONFIDENCE_BINS = 20
SAMPLE_SIZE = 1000


def quantile_edges(values: np.ndarray, n_bins: int = FEATURE_BINS) -> np.ndarray:
    """Edges at the training quantiles (equal-mass bins, robust to skew), deduplicated:
    sparse features such as blank pixels repeat a quantile many times. The outer edges are
    the min and the max; a constant feature gets one bin around its value."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges


def monitored_features(x: np.ndarray, max_features: int = MAX_FEATURES) -> list[int]:
    """Indices of the highest-variance non-constant features (ties: lower index first),
    capped so that per-feature drift metrics stay a bounded number of time series."""
    variance = np.asarray(x, dtype=np.float64).reshape(len(x), -1).var(axis=0)
    order = np.argsort(-variance, kind="stable")
    return sorted(int(i) for i in order[:max_features] if variance[i] > 0)


def _histogram(values: np.ndarray, edges: np.ndarray) -> Histogram:
    return Histogram(bin_edges=tuple(float(e) for e in edges),
                     counts=tuple(int(c) for c in bin_counts(values, edges)))


def build_reference(x_train: np.ndarray, train_probs: np.ndarray, *, input_name: str = "x",
                    max_features: int = MAX_FEATURES, n_bins: int = FEATURE_BINS,
                    confidence_bins: int = CONFIDENCE_BINS, sample_size: int = SAMPLE_SIZE,
                    seed: int = 0) -> DriftReference:
    """x_train: raw training inputs; train_probs: their calibrated probabilities."""
    rows = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    features = [FeatureReference(name=f"{input_name}_{i}", statistic="value", index=i,
                                 histogram=_histogram(rows[:, i], quantile_edges(rows[:, i], n_bins)))
                for i in monitored_features(rows, max_features)]
    if rows.shape[1] > max_features:
        # Wide inputs (images): the capped features miss most of the row, so add row summaries.
        for stat, values in (("row_mean", rows.mean(axis=1)), ("row_std", rows.std(axis=1))):
            features.append(FeatureReference(name=stat, statistic=stat,
                                             histogram=_histogram(values, quantile_edges(values, n_bins))))
    probs = np.asarray(train_probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    predicted = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) / len(probs)
    rng = np.random.default_rng(seed)
    sample = np.sort(confidence[rng.choice(len(confidence), min(sample_size, len(confidence)),
                                           replace=False)])
    return DriftReference(
        n=len(rows), features=tuple(features),
        predicted_class_frequencies=tuple(float(p) for p in predicted),
        confidence=_histogram(confidence, np.linspace(0.0, 1.0, confidence_bins + 1)),
        confidence_sample=tuple(float(c) for c in sample))
