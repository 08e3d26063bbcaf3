"""The drift statistics and their thresholds (numpy and scipy only): population stability
index, chi-square goodness of fit, Holm's correction, Jensen-Shannon distance, and the
binning the exporter shares, so that live and reference bins match exactly. How they make
the drift signals is service.monitoring.drift."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import stats
from scipy.spatial.distance import jensenshannon


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin, values outside the edges clipped into the outer bins; bins are
    [lo, hi) except the last, [lo, hi] (numpy.histogram's convention)."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(clipped, bins=edges)[0]


# The signals' thresholds (documented in docs/metrics.md; service.monitoring.drift applies them).
PSI_THRESHOLD = 0.2
FEATURE_ALPHA = 0.01
JS_THRESHOLD = 0.1
KS_ALPHA = 0.01
KS_MIN_STATISTIC = 0.1
DISAGREEMENT_ALPHA = 0.01
DISAGREEMENT_MIN_RISE = 0.05
EPS = 1e-4
"""Floor on bin proportions in PSI (an empty bin would make it infinite)."""


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
