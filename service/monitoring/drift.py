"""Drift monitoring: a sliding window of live traffic per served model, compared with the
training reference in its manifest.

Signals (thresholds are service.monitoring.drift_statistics' constants, documented in
docs/metrics.md):

- ``feature``: per monitored input feature, the population stability index (PSI) on the
  reference's fixed bin edges (binned with the export's own `bin_counts`, so live and
  reference bins match exactly), and a chi-square goodness-of-fit p-value of the live
  counts against the reference proportions. The p-values are Holm-corrected across the
  model's features (family-wise error rate), and a feature is flagged only when both hold:
  PSI > 0.2 (the effect is large enough to matter) and Holm-adjusted p < 0.01 (it is not
  sampling noise in a small window).
- ``input``: the feature family: max PSI, min adjusted p, flagged if any feature is.
- ``prediction``: Jensen-Shannon distance (base 2, in [0, 1]) between the live
  predicted-class distribution and the reference's predicted_class_frequencies; flagged
  at JS > 0.1. The p-value is a chi-square test of the live class counts (informative).
- ``confidence``: two-sample Kolmogorov-Smirnov statistic and p-value of live confidence
  against the reference's confidence_sample; flagged at p < 0.01 and D > 0.1. The effect
  floor matters because the reference is measured on the training split, where every
  model is somewhat more confident than on unseen data: with a full window the test alone
  would flag in-distribution traffic.
- ``disagreement`` (ensembles): share of rows on which not every answering member voted
  for the winner, against the same share on the validation split (replayed through the
  ensemble's vote at load time); one-sided exact binomial test, flagged at p < 0.01 and a
  rise of more than 0.05 over the baseline.

Which reference: see service.monitoring.drift_reference (a single model's manifest; an
ensemble's members' features and classes, and its own vote replayed on the validation split).
The statistics and their thresholds are service.monitoring.drift_statistics.

Per request the cost is O(rows x monitored features): values are written into
preallocated numpy ring buffers. Statistics are computed by `evaluate()`, off the hot
path (the monitor calls it from a periodic task, in a worker thread, on a snapshot).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from service.monitoring.drift_reference import ModelReference
from service.monitoring.drift_statistics import (
    DISAGREEMENT_ALPHA, DISAGREEMENT_MIN_RISE, FEATURE_ALPHA, JS_THRESHOLD, KS_ALPHA, KS_MIN_STATISTIC,
    PSI_THRESHOLD, bin_counts, chi_square_pvalue, holm, js_distance, psi)

SIGNALS = ("feature", "input", "prediction", "confidence", "disagreement")


# -- the window ----------------------------------------------------------------------------
class RingBuffer:
    """The last `capacity` rows of a fixed-width float record, preallocated."""

    def __init__(self, capacity: int, width: int = 0, dtype=np.float64) -> None:
        shape = (capacity, width) if width else (capacity,)
        self._data = np.zeros(shape, dtype=dtype)
        self.capacity = capacity
        self._next = 0
        self.size = 0
        self.total = 0

    def extend(self, values: np.ndarray) -> None:
        n = len(values)
        if n == 0:
            return
        if n >= self.capacity:
            self._data[:] = values[-self.capacity:]
            self._next, self.size = 0, self.capacity
        else:
            end = self._next + n
            if end <= self.capacity:
                self._data[self._next:end] = values
            else:
                split = self.capacity - self._next
                self._data[self._next:] = values[:split]
                self._data[:n - split] = values[split:]
            self._next = end % self.capacity
            self.size = min(self.capacity, self.size + n)
        self.total += n

    def values(self) -> np.ndarray:
        """A copy of the window, oldest first."""
        if self.size < self.capacity:
            return self._data[:self.size].copy()
        return np.concatenate([self._data[self._next:], self._data[:self._next]])

@dataclass(frozen=True)
class SignalValue:
    signal: str
    feature: str
    distance: float
    pvalue: float | None
    detected: bool


@dataclass
class DriftWindow:
    """Live window of one served model (a single model or an ensemble)."""

    reference: ModelReference
    capacity: int
    key: tuple = ()
    """What the reference was built from (versions); a change rebuilds the window."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._values = self.reference.value_indices
        self._summaries = [f.statistic for f in self.reference.features if f.statistic != "value"]
        width = len(self._values) + len(self._summaries)
        self.features = RingBuffer(self.capacity, width)
        self.classes = RingBuffer(self.capacity, dtype=np.int64)
        self.confidence = RingBuffer(self.capacity)
        self.disagree = RingBuffer(self.capacity, dtype=bool)
        self._pending: deque[tuple] = deque()
        self._pending_rows = 0

    @property
    def fill(self) -> float:
        return min(1.0, (self.classes.size + self._pending_rows) / self.capacity)

    def observe(self, rows: np.ndarray | None, classes: np.ndarray, confidence: np.ndarray,
                agreement: np.ndarray | None) -> None:
        """Queue a request's rows and answers: one append on the hot path. The features are
        extracted in bulk by the evaluation, off the request path."""
        with self._lock:
            self._pending.append((rows, classes, confidence, agreement))
            self._pending_rows += len(classes)
            # Older pending requests would fall out of the window anyway: drop them now.
            while self._pending_rows - len(self._pending[0][1]) >= self.capacity:
                self._pending_rows -= len(self._pending.popleft()[1])

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending, self._pending_rows = self._pending, deque(), 0
        if not pending:
            return
        rows = [r for r, _, _, _ in pending if r is not None]
        if rows:
            flat = np.concatenate([r.reshape(r.shape[0], -1) for r in rows])
            parts = [flat[:, self._values].astype(np.float64, copy=False)]
            for stat in self._summaries:
                parts.append((flat.mean(axis=1) if stat == "row_mean" else flat.std(axis=1))[:, None])
            self.features.extend(np.hstack(parts) if len(parts) > 1 else parts[0])
        self.classes.extend(np.concatenate([c for _, c, _, _ in pending]))
        self.confidence.extend(np.concatenate([c for _, _, c, _ in pending]))
        agreement = [a for _, _, _, a in pending if a is not None]
        if agreement:
            self.disagree.extend(np.concatenate(agreement) < 1.0 - 1e-9)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._drain()
        return (self.features.values(), self.classes.values(), self.confidence.values(),
                self.disagree.values())

    def evaluate(self, min_rows: int) -> list[SignalValue]:
        features, classes, confidence, disagree = self.snapshot()
        return evaluate(self.reference, features, classes, confidence, disagree, min_rows)


def evaluate(reference: ModelReference, features: np.ndarray, classes: np.ndarray,
             confidence: np.ndarray, disagree: np.ndarray, min_rows: int) -> list[SignalValue]:
    """Every drift signal of one window (signals whose window holds < min_rows are skipped)."""
    out: list[SignalValue] = []
    feature_refs = [f for f in reference.features if f.statistic == "value"] + \
                   [f for f in reference.features if f.statistic != "value"]
    if len(features) >= min_rows and feature_refs:
        psis, pvalues = [], []
        for column, ref in enumerate(feature_refs):
            edges = np.asarray(ref.histogram.bin_edges)
            counts = bin_counts(features[:, column], edges)
            psis.append(psi(ref.histogram.counts, counts))
            pvalues.append(chi_square_pvalue(np.asarray(ref.histogram.counts), counts))
        adjusted = holm(pvalues)
        flags = [p_ > PSI_THRESHOLD and a < FEATURE_ALPHA for p_, a in zip(psis, adjusted)]
        for ref, value, p, flag in zip(feature_refs, psis, adjusted, flags):
            out.append(SignalValue("feature", ref.name, value, float(p), flag))
        out.append(SignalValue("input", "", float(max(psis)), float(min(adjusted)), any(flags)))
    if len(classes) >= min_rows:
        k = len(reference.class_frequencies)
        counts = np.bincount(np.clip(classes, 0, k - 1), minlength=k)
        js = js_distance(reference.class_frequencies, counts)
        p = chi_square_pvalue(reference.class_frequencies * 1000.0, counts)
        out.append(SignalValue("prediction", "", js, p, js > JS_THRESHOLD))
    if len(confidence) >= min_rows and len(reference.confidence_sample):
        ks = stats.ks_2samp(confidence, reference.confidence_sample)
        out.append(SignalValue("confidence", "", float(ks.statistic), float(ks.pvalue),
                               bool(ks.pvalue < KS_ALPHA and ks.statistic > KS_MIN_STATISTIC)))
    if reference.disagreement_baseline is not None and len(disagree) >= min_rows:
        k, n, p0 = int(disagree.sum()), len(disagree), reference.disagreement_baseline
        rate = k / n
        p = float(stats.binomtest(k, n, min(max(p0, 1e-6), 1 - 1e-6), alternative="greater").pvalue)
        out.append(SignalValue("disagreement", "", rate - p0, p,
                               p < DISAGREEMENT_ALPHA and rate - p0 > DISAGREEMENT_MIN_RISE))
    return out
