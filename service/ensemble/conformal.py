"""Split conformal prediction sets and selective answers, calibrated on validation rows.

Scores, computed as MAPIE 1.6's split conformal classifier computes them (the tests check
Quorum's sets against MAPIE's on the same probabilities):
- LAC: 1 - p(true class). A row's set holds every class c with 1 - p(c) <= q.
- APS: the probability mass of the classes ranked at or above the true class, less
  u * p(true class), u uniform from a seeded generator (randomised calibration scores). A set holds the classes in decreasing order of
  probability until their mass reaches q, the class that reaches it included.
Mondrian (class-conditional): one quantile per class, from the calibration rows of that class,
so that coverage holds for every class, not only on average.

The quantile is the ceil((n + 1)(1 - alpha))-th smallest of the n calibration scores. It
exists only when that rank is at most n: a coverage the rows cannot support is refused,
naming the largest coverage they do support. Everything here is numpy/scipy over arrays of
(rows, classes): computed once per version at load, applied once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import beta

from service.errors import InvalidInput

SCORES = ("lac", "aps")
EPSILON = 1e-8  # MAPIE's tolerance in the set comparisons
SEED = 0  # APS's randomised calibration scores: fixed, so every replica computes the same sets


def check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < float(value) < 1.0:
        raise InvalidInput(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def rank_for(coverage: float, n: int) -> int:
    """The 1-based rank of the calibration score that is the quantile for `coverage`
    (through alpha = 1 - coverage, as MAPIE computes it: the same float, the same rank)."""
    return int(np.ceil((n + 1) * (1 - (1 - coverage))))


def max_coverage(n: int) -> float:
    """The largest coverage n calibration rows support: rank n, i.e. n / (n + 1)."""
    return n / (n + 1) if n else 0.0


def calibration_scores(score: str, probabilities: np.ndarray, labels: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Each calibration row's score under `score` (rows: probabilities (n, C), labels (n,))."""
    p = np.asarray(probabilities, dtype=np.float64)
    rows = np.arange(labels.size)
    truth = p[rows, labels]
    if score == "lac":
        return 1.0 - truth
    if score == "aps":
        order = np.flip(np.argsort(p, axis=1), axis=1)
        cumulative = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
        position = np.argmax(order == labels[:, None], axis=1)
        u = np.random.RandomState(seed).uniform(size=labels.size)
        return cumulative[rows, position] - u * truth
    raise ValueError(f"unknown conformity score {score!r}")


def _quantile(scores: np.ndarray, coverage: float, what: str) -> float:
    n = scores.size
    rank = rank_for(coverage, n)
    if rank > n:
        raise InvalidInput(f"coverage {coverage:g} needs at least {math.ceil(coverage / (1 - coverage))} calibration "
                           f"rows{what}; there are {n}, which support a coverage of at most {max_coverage(n):.4f}")
    return float(np.sort(scores)[rank - 1])


def sets(score: str, probabilities: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """Prediction sets (rows, C) of bool for `probabilities` at the calibrated `threshold`
    (one number, or one per class for Mondrian LAC)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if score == "lac":
        return (1.0 - p) - np.asarray(threshold) <= EPSILON
    order = np.flip(np.argsort(p, axis=1), axis=1)
    cumulative = np.empty_like(p)
    np.put_along_axis(cumulative, order, np.cumsum(np.take_along_axis(p, order, axis=1), axis=1), axis=1)
    reached = np.ma.masked_less(cumulative - threshold, -EPSILON)
    last = np.asarray(reached.argmin(axis=1))[:, None]  # the first class, in rank order, whose mass reaches q
    p_last = np.take_along_axis(p, last, axis=1)
    zero = p_last <= EPSILON  # a class of probability 0 never joins a set
    if zero.any():
        smallest = np.ma.masked_less(p, EPSILON).filled(np.inf).min(axis=1, keepdims=True)
        p_last = np.where(zero, smallest, p_last)
    return p - p_last >= -EPSILON


@dataclass(frozen=True)
class ConformalCalibration:
    """One model's calibration scores, ready to give a quantile for any coverage."""

    score: str
    scores: np.ndarray
    labels: np.ndarray
    classes: int
    mondrian: bool = False
    _cache: dict[float, np.ndarray | float] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def fit(cls, score: str, probabilities: np.ndarray, labels: np.ndarray, mondrian: bool = False,
            seed: int = SEED) -> ConformalCalibration:
        if score not in SCORES:
            raise InvalidInput(f"conformity score must be one of {list(SCORES)}, got {score!r}")
        if mondrian and score != "lac":
            raise InvalidInput("class-conditional (mondrian) sets are computed for the lac score only")
        labels = np.asarray(labels, dtype=np.int64)
        probabilities = np.asarray(probabilities, dtype=np.float64)
        return cls(score, calibration_scores(score, probabilities, labels, seed), labels, probabilities.shape[1],
                   mondrian)

    @property
    def rows(self) -> int:
        return int(self.scores.size)

    def threshold(self, coverage: float) -> np.ndarray | float:
        """The quantile for `coverage` (per class with Mondrian); InvalidInput when the rows
        cannot support it. Cached per coverage: a request asks for a handful of values."""
        coverage = check_fraction("coverage", coverage)
        if coverage not in self._cache:
            if self.mondrian:
                self._cache[coverage] = np.asarray([
                    _quantile(self.scores[self.labels == c], coverage, f" of class {c}") for c in range(self.classes)])
            else:
                self._cache[coverage] = _quantile(self.scores, coverage, "")
        return self._cache[coverage]

    def sets(self, probabilities: np.ndarray, coverage: float) -> np.ndarray:
        return sets(self.score, probabilities, self.threshold(coverage))


@dataclass(frozen=True)
class SelectiveCalibration:
    """Which rows to answer so that the error rate among answered rows stays under a risk.

    Learn-then-Test with a Bonferroni correction: the candidate thresholds are GRID
    confidences spread over the calibration rows' ranks (at most GRID; ties answered
    together). A candidate is certified when the Clopper-Pearson upper bound, at confidence
    1 - DELTA / candidates, of the error rate among the calibration rows it answers is at most
    the risk; the loosest certified candidate is chosen. With probability at least 1 - DELTA
    over the calibration rows, every certified threshold, the chosen one included, keeps the
    error rate among answered rows at or under the risk."""

    confidence: np.ndarray
    """Calibration rows' confidence, in decreasing order."""
    errors: np.ndarray
    """Cumulative count of wrong answers among the rows down to each confidence."""
    _cache: dict[float, float] = field(default_factory=dict, compare=False, repr=False)
    DELTA = 0.05
    GRID = 50

    @classmethod
    def fit(cls, confidence: np.ndarray, correct: np.ndarray) -> SelectiveCalibration:
        order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
        return cls(np.asarray(confidence, dtype=np.float64)[order], np.cumsum(~np.asarray(correct, bool)[order]))

    def candidates(self) -> np.ndarray:
        """Answered-row counts k of the candidate thresholds (confidence >= the k-th highest)."""
        stops = np.flatnonzero(np.r_[self.confidence[1:] < self.confidence[:-1], True]) + 1
        picked = np.unique(np.linspace(0, stops.size - 1, min(self.GRID, stops.size)).round().astype(int))
        return stops[picked]

    def threshold(self, max_risk: float) -> float:
        """The lowest confidence still answered at `max_risk`; InvalidInput when none is certified."""
        max_risk = check_fraction("max_risk", max_risk)
        if max_risk not in self._cache:
            self._cache[max_risk] = self._threshold(max_risk)
        return self._cache[max_risk]

    def _threshold(self, max_risk: float) -> float:
        k = self.candidates()
        e = self.errors[k - 1]
        level = 1 - self.DELTA / k.size
        upper = np.where(e >= k, 1.0, beta.ppf(level, e + 1, k - e))
        certified = np.flatnonzero(upper <= max_risk)
        if not certified.size:
            smallest = 1 - (1 - level) ** (1 / self.confidence.size)
            raise InvalidInput(f"max_risk {max_risk:g} cannot be certified on {self.confidence.size} calibration rows "
                               f"(at {1 - self.DELTA:.0%} confidence); the smallest risk they could certify, with "
                               f"no error among them, is {smallest:.4f}")
        return float(self.confidence[k[certified[-1]] - 1])
