"""Drift monitoring: a sliding window of live traffic per served model, compared with the
training reference in its manifest.

Signals (thresholds are module constants, documented in docs/metrics.md):

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

Which reference: a single model uses its own manifest. An ensemble uses its first
member's input features (all members are trained on the same data, so their feature
references are the same) and, for its predicted classes, the members' predicted-class
frequencies averaged. For its confidence it does not pool the members' samples: the
vote's confidence is a different quantity (a confidence-weighted vote of five calibrated
members is less peaked than any member on its own training data; pooled samples gave
KS D = 0.33 on in-distribution test traffic). Its reference is the ensemble's own vote
on the validation split, replayed at load time from the members' stored validation
probabilities, the same replay that gives the disagreement baseline.

Per request the cost is O(rows x monitored features): values are written into
preallocated numpy ring buffers. Statistics are computed by `evaluate()`, off the hot
path (the monitor calls it from a periodic task, in a worker thread, on a snapshot).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import stats
from scipy.spatial.distance import jensenshannon

from service.repository.manifest import DriftReference, FeatureReference, VariantManifest

log = logging.getLogger(__name__)


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin, values outside the edges clipped into the outer bins; bins are
    [lo, hi) except the last, [lo, hi] (numpy.histogram's convention)."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(clipped, bins=edges)[0]

PSI_THRESHOLD = 0.2
FEATURE_ALPHA = 0.01
JS_THRESHOLD = 0.1
KS_ALPHA = 0.01
KS_MIN_STATISTIC = 0.1
DISAGREEMENT_ALPHA = 0.01
DISAGREEMENT_MIN_RISE = 0.05
EPS = 1e-4
"""Floor on bin proportions in PSI (an empty bin would make it infinite)."""

SIGNALS = ("feature", "input", "prediction", "confidence", "disagreement")


# -- the statistics ------------------------------------------------------------------------
def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, eps: float = EPS) -> float:
    """Population stability index of two count (or proportion) vectors over the same bins:
    sum((a - e) * ln(a / e)) over proportions floored at `eps`."""
    e = np.maximum(np.asarray(expected, dtype=np.float64) / max(np.sum(expected), 1e-12), eps)
    a = np.maximum(np.asarray(actual, dtype=np.float64) / max(np.sum(actual), 1e-12), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def chi_square_pvalue(reference: np.ndarray, counts: np.ndarray) -> float:
    """Goodness of fit of live `counts` to the reference proportions (bins the reference
    never saw get a small floor so that live mass there counts as evidence, not an error)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n == 0 or len(counts) < 2:
        return 1.0
    p = np.maximum(np.asarray(reference, dtype=np.float64), 0) + 0.5
    expected = p / p.sum() * n
    return float(stats.chisquare(counts, expected).pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (monotone step-down; reject where adjusted < alpha)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out


def js_distance(reference: np.ndarray, live_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2: 0 same, 1 disjoint) of two class distributions."""
    live = np.asarray(live_counts, dtype=np.float64)
    if live.sum() == 0:
        return 0.0
    return float(jensenshannon(np.asarray(reference, dtype=np.float64), live, base=2))


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


# -- the reference of one served model -----------------------------------------------------
@dataclass(frozen=True)
class ModelReference:
    features: tuple[FeatureReference, ...]
    class_frequencies: np.ndarray
    confidence_sample: np.ndarray
    disagreement_baseline: float | None = None
    """Validation share of rows with agreement < 1 (ensembles only)."""
    validation_rows: int = 0

    @property
    def value_indices(self) -> np.ndarray:
        return np.array([f.index for f in self.features if f.statistic == "value"], dtype=np.intp)

    @classmethod
    def of_model(cls, manifest: VariantManifest) -> "ModelReference":
        ref = manifest.drift_reference
        return cls(ref.features, np.asarray(ref.predicted_class_frequencies),
                   np.asarray(ref.confidence_sample))

    @classmethod
    def of_ensemble(cls, manifests: Sequence[VariantManifest], policy: str, calibration=None) -> "ModelReference":
        """`calibration` (service.ensemble.calibration.VoteCalibration): the vote's own, so
        that the reference confidences are those the ensemble answers with."""
        refs: list[DriftReference] = [m.drift_reference for m in manifests]
        frequencies = np.mean([r.predicted_class_frequencies for r in refs], axis=0)
        weights = calibration.weights_of([m.name for m in manifests]) if calibration is not None else None
        replay = replay_validation(manifests, policy, weights)
        if replay is not None and calibration is not None:
            replay = calibration.apply(replay)
        if replay is None:
            sample = np.sort(np.concatenate([r.confidence_sample for r in refs]))
            return cls(refs[0].features, frequencies, sample)
        baseline = float(np.mean(replay.agreement < 1.0 - 1e-9))
        return cls(refs[0].features, frequencies, np.sort(replay.confidence), baseline,
                   len(replay.confidence))


def replay_validation(manifests: Sequence[VariantManifest], policy: str,
                      member_weights: Sequence[float] | None = None):
    """The ensemble's vote on the validation rows every member stored (its members'
    calibrated validation probabilities replayed through `vote`); None when the members
    share no validation rows."""
    from service.ensemble.voting import vote

    common = set(manifests[0].validation.indices)
    for m in manifests[1:]:
        common &= set(m.validation.indices)
    if not common or len(manifests) < 2:
        return None
    keys = sorted(common)
    probs = []
    for m in manifests:
        position = {index: row for row, index in enumerate(m.validation.indices)}
        table = np.asarray(m.validation.probabilities, dtype=np.float64)
        probs.append(table[[position[k] for k in keys]])
    accuracy = [m.validation.calibrated.accuracy for m in manifests]
    return vote(policy, probs, [m.name for m in manifests], validation_accuracy=accuracy,
                member_weights=member_weights)


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
