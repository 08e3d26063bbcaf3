"""Prediction sets and selective answers (service/ensemble/conformal.py) against independent
oracles: MAPIE 1.6's split conformal classifier (LAC and APS) on the same probabilities, MAPIE
per class for the class-conditional sets, and scipy's binomial for the risk bound. The
probabilities are the bundled digits members' stored validation replays (real, calibrated)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier
from scipy.stats import binom
from sklearn.base import BaseEstimator, ClassifierMixin

from service.ensemble.conformal import ConformalCalibration, SelectiveCalibration, max_coverage
from service.errors import InvalidInput
from tests.helpers import ROOT


class _Stored(ClassifierMixin, BaseEstimator):
    """A prefit classifier whose predict_proba(X) is the stored probabilities of rows X[:, 0]."""

    def __init__(self, probabilities=None):
        self.probabilities = probabilities

    def fit(self, X, y):  # prefit: never called by MAPIE
        raise AssertionError("prefit")

    def predict_proba(self, X):
        return self.probabilities[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


def _replay(name: str) -> tuple[np.ndarray, np.ndarray]:
    validation = json.loads((ROOT / "models" / name / "1" / "variant.json").read_text())["validation"]
    return np.asarray(validation["probabilities"], np.float64), np.asarray(validation["labels"])


@pytest.fixture(scope="module", params=["digits_mlp_a", "digits_logreg"])
def split(request):
    """Half the rows calibrate, the other half are the new rows whose sets are compared."""
    p, y = _replay(request.param)
    rng = np.random.default_rng(7)
    order = rng.permutation(y.size)
    cal, new = order[: y.size // 2], order[y.size // 2:]
    return p, y, cal, new


def _mapie(score, coverage, p, y, cal, new):
    estimator = _Stored(p)
    estimator.classes_ = np.arange(p.shape[1])
    mapie = SplitConformalClassifier(estimator, confidence_level=coverage, conformity_score=score,
                                     prefit=True, random_state=0)
    mapie.conformalize(cal[:, None], y[cal])
    _, sets = mapie.predict_set(new[:, None])
    return sets[:, :, 0]


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_sets_equal_mapies(split, score, coverage):
    p, y, cal, new = split
    ours = ConformalCalibration.fit(score, p[cal], y[cal]).sets(p[new], coverage)
    np.testing.assert_array_equal(ours, _mapie(score, coverage, p, y, cal, new))


@pytest.mark.filterwarnings("ignore:.*conformalization dataset has less labels:UserWarning")
def test_class_conditional_sets_equal_mapie_per_class(split):
    """Mondrian LAC: class c is in a row's set exactly when MAPIE, calibrated on the rows of
    class c only, puts it there."""
    p, y, cal, new = split
    ours = ConformalCalibration.fit("lac", p[cal], y[cal], mondrian=True).sets(p[new], 0.8)
    for c in range(p.shape[1]):
        of_c = cal[y[cal] == c]
        np.testing.assert_array_equal(ours[:, c], _mapie("lac", 0.8, p, y, of_c, new)[:, c], err_msg=f"class {c}")


def test_a_coverage_the_rows_cannot_support_is_refused_naming_the_limit(split):
    p, y, cal, _ = split
    calibration = ConformalCalibration.fit("lac", p[cal], y[cal])
    n = cal.size
    calibration.threshold(max_coverage(n))  # the largest supported: answered
    with pytest.raises(InvalidInput, match=rf"there are {n}, which support a coverage of at most {n / (n + 1):.4f}"):
        calibration.threshold(0.999)
    for bad in (0.0, 1.0, -0.5, float("nan"), True):
        with pytest.raises(InvalidInput, match="coverage must be a number strictly between 0 and 1"):
            calibration.threshold(bad)


def test_mondrian_refuses_a_coverage_one_class_cannot_support(split):
    p, y, cal, _ = split
    calibration = ConformalCalibration.fit("lac", p[cal], y[cal], mondrian=True)
    with pytest.raises(InvalidInput, match="calibration rows of class"):
        calibration.threshold(0.99)


def test_coverage_holds_on_new_rows(split):
    """The guarantee itself, loosely: on the held-out half, 90% sets cover at least ~90%."""
    p, y, cal, new = split
    for score in ("lac", "aps"):
        covered = ConformalCalibration.fit(score, p[cal], y[cal]).sets(p[new], 0.9)[np.arange(new.size), y[new]]
        assert covered.mean() >= 0.9 - 3 * np.sqrt(0.09 / new.size), (score, covered.mean())


def _binomial_upper(errors: int, n: int, delta: float) -> float:
    """Clopper-Pearson's upper bound found by bisection on scipy's binomial cdf (not Beta)."""
    lo, hi = errors / n, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom.cdf(errors, n, mid) > delta else (lo, mid)
    return hi


def test_selective_threshold_is_the_loosest_certified_candidate():
    rng = np.random.default_rng(3)
    confidence = np.round(rng.uniform(0.3, 1.0, 2000), 3)  # ties: answered together
    correct = rng.uniform(size=2000) < confidence  # errors fall as confidence rises
    max_risk = 0.1
    calibration = SelectiveCalibration.fit(confidence, correct)
    ranks = calibration.candidates()
    ordered = np.sort(confidence)[::-1]
    assert ranks.size <= SelectiveCalibration.GRID and all(
        k == ordered.size or ordered[k] < ordered[k - 1] for k in ranks)  # never splits a tie
    delta = SelectiveCalibration.DELTA / ranks.size
    expected = None
    for k in ranks:
        answered = confidence >= ordered[k - 1]
        if _binomial_upper(int((~correct[answered]).sum()), int(answered.sum()), delta) <= max_risk:
            expected = ordered[k - 1]
    assert expected is not None and calibration.threshold(max_risk) == pytest.approx(expected)
    answered = confidence >= expected
    assert (~correct[answered]).mean() <= max_risk


def test_an_uncertifiable_risk_is_refused_naming_the_limit():
    calibration = SelectiveCalibration.fit(np.linspace(0.5, 1.0, 50), np.ones(50, bool))
    limit = 1 - (SelectiveCalibration.DELTA / 50) ** (1 / 50)
    with pytest.raises(InvalidInput, match=rf"the smallest risk they could certify, with no error among them, is "
                                           rf"{limit:.4f}"):
        calibration.threshold(0.01)
    assert calibration.threshold(0.2) == 0.5
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(InvalidInput, match="max_risk must be a number strictly between 0 and 1"):
            calibration.threshold(bad)
