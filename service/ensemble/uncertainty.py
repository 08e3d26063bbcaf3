"""What a model's answers come with when asked: prediction sets with a coverage guarantee and
selective answers at a stated risk, fitted on its members' validation replay.

The guarantee needs calibration rows that fitted nothing in the score. The served
probabilities do not qualify: each member's temperature was fitted on every validation row at
export, and the vote's temperature and `stacked` weights on the whole replay at load. So the
replay is split in two (by position among the rows every member shares, sorted by example:
even rows fit, odd rows calibrate), and the sets use a score function of their own, every
parameter of it fitted on the even rows:
- each member's temperature, refitted on log p of its stored calibrated probabilities:
  softmax(log p / t) = softmax(z / (T t)), so the fitted T t is the one the even rows alone
  choose for the logits z, whatever T the export chose;
- the members' accuracy (`confidence`-style policies) and the `stacked` weights;
- the vote's temperature.
The conformal quantile and the selective threshold are then calibrated on the odd rows, which
are exchangeable with new rows given that function: the coverage and risk guarantees hold as
stated (conformal.py). The answer's label is the served vote's; its set comes from this
function, so in rare rows at the boundary of the two fits the label may lie outside its set.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from service.ensemble.calibration import EPS, T_BOUNDS, fit, fit_pool_weights, scale
from service.ensemble.conformal import ConformalCalibration, SelectiveCalibration
from service.ensemble.voting import calibrate, vote

ROW_CONSTANT = ("soft", "stacked", "accuracy")  # policies whose member weights are the same in every row
TINY = 1e-30  # log p of a probability that underflowed (float32 answers) stays finite


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(p, dtype=np.float64), TINY))


def _member_temperature(log_p: np.ndarray, labels: np.ndarray) -> float:
    """The t minimising the NLL of softmax(log p / t) on these rows (t = 1 if none lowers it)."""
    rows = np.arange(labels.size)

    def loss(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, labels]))

    best = minimize_scalar(loss, bounds=(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])), method="bounded",
                           options={"xatol": 1e-5})
    return float(np.exp(best.x)) if loss(best.x) < loss(0.0) else 1.0


@dataclass(frozen=True)
class SetScorer:
    """The probabilities behind the sets: the served vote's form, fitted on the even rows."""

    policy: str
    members: tuple[str, ...]
    temperatures: tuple[float, ...]
    accuracy: tuple[float, ...]
    weights: tuple[float, ...]
    vote_temperature: float
    row_weights: tuple[float, ...] | None = None
    """The vote's weight of each member when it is the same for every row (soft, stacked,
    accuracy): the per-batch path is then one weighted mean instead of a whole vote."""

    def probabilities(self, member_probs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(n, C) from the members' calibrated probabilities, in `members` order."""
        if self.row_weights is None:
            tempered = [calibrate(_log(p), t) for p, t in zip(member_probs, self.temperatures)]
            voted = vote(self.policy, tempered, self.members, validation_accuracy=self.accuracy,
                         member_weights=self.weights).probabilities
        else:  # the same numbers in a few in-place vectorised steps over (members, rows, classes):
            # softmax(log p / t) is p ** (1 / t) normalised (p <= 1: no overflow; a row's largest
            # p is at least 1 / C, so its power never underflows to 0 within T_BOUNDS)
            z = np.asarray(member_probs, dtype=np.float64)  # (M, n, C): a copy, worked on in place
            np.maximum(z, TINY, out=z)
            np.power(z, self._inverse_temperatures, out=z)
            z /= z.sum(axis=2, keepdims=True)
            voted = np.tensordot(self._row_weights, z, axes=1)  # rows sum to 1: the weights do
            if len(self.members) == 1:
                return voted
            voted += EPS  # then the vote's temperature, as calibration.scale computes it
            np.power(voted, 1.0 / self.vote_temperature, out=voted)
            voted /= voted.sum(axis=1, keepdims=True)
            return voted
        return scale(voted, self.vote_temperature) if len(self.members) > 1 else np.asarray(voted, np.float64)

    @functools.cached_property
    def _inverse_temperatures(self) -> np.ndarray:
        return 1.0 / np.asarray(self.temperatures, dtype=np.float64)[:, None, None]

    @functools.cached_property
    def _row_weights(self) -> np.ndarray:
        assert self.row_weights is not None
        weights = np.asarray(self.row_weights, dtype=np.float64)
        return weights / weights.sum()

    @classmethod
    def fit(cls, policy: str, probabilities: Mapping[str, np.ndarray], labels: np.ndarray) -> SetScorer:
        members = tuple(probabilities)
        temperatures = tuple(_member_temperature(_log(probabilities[m]), labels) for m in members)
        tempered = [calibrate(_log(probabilities[m]), t) for m, t in zip(members, temperatures)]
        accuracy = tuple(float(np.mean(p.argmax(axis=1) == labels)) for p in tempered)
        weights = tuple(float(w) for w in fit_pool_weights(tempered, labels)) if len(members) > 1 else (1.0,)
        if len(members) == 1:
            return cls(policy, members, temperatures, accuracy, weights, 1.0)
        voted = vote(policy, tempered, members, validation_accuracy=accuracy, member_weights=weights)
        fixed = None
        if policy in ROW_CONSTANT:
            fixed = tuple(float(w) for w in voted.member_weights[:, 0])
        return cls(policy, members, temperatures, accuracy, weights,
                   fit(policy, voted.probabilities, labels).temperature, fixed)


@dataclass(frozen=True)
class Uncertainty:
    """One model's (or one ensemble member subset's) sets and selective threshold."""

    scorer: SetScorer
    conformal: ConformalCalibration
    selective: SelectiveCalibration
    fit_rows: int
    held_out: np.ndarray
    """(calibration rows, C) the score function's probabilities on the calibration rows."""

    def mean_set_size(self, coverage: float) -> float:
        """The sets' mean size on the calibration rows at `coverage`."""
        return float(self.conformal.sets(self.held_out, coverage).sum(axis=1).mean())

    @property
    def calibration_rows(self) -> int:
        return self.conformal.rows

    @classmethod
    def fit(cls, policy: str, probabilities: Mapping[str, np.ndarray], labels: np.ndarray, score: str = "lac",
            mondrian: bool = False) -> Uncertainty:
        """`probabilities`: each member's stored calibrated validation probabilities on the
        rows they share (sorted by example), in one class order; `labels`: those rows' truth."""
        labels = np.asarray(labels, dtype=np.int64)
        fitting, calibrating = slice(0, None, 2), slice(1, None, 2)
        scorer = SetScorer.fit(policy, {m: np.asarray(p)[fitting] for m, p in probabilities.items()},
                               labels[fitting])
        held_out = scorer.probabilities([np.asarray(probabilities[m])[calibrating] for m in scorer.members])
        truth = labels[calibrating]
        return cls(scorer, ConformalCalibration.fit(score, held_out, truth, mondrian),
                   SelectiveCalibration.fit(held_out.max(axis=1), held_out.argmax(axis=1) == truth),
                   int(labels[fitting].size), held_out)

    def check(self, coverage: float | None, max_risk: float | None) -> None:
        """InvalidInput (naming the limit) for a coverage or risk these rows cannot support:
        asked before the request is queued, so a refused one costs no inference."""
        if coverage is not None:
            self.conformal.threshold(coverage)
        if max_risk is not None:
            self.selective.threshold(max_risk)

    def answer_from(self, p: np.ndarray, coverage: float | None, max_risk: float | None) -> dict[str, np.ndarray]:
        """The uncertainty outputs of rows whose score-function probabilities are `p` (computed
        once per batch): `prediction_set` and `set_size` when a coverage is asked, `abstained`
        when a risk is."""
        out: dict[str, np.ndarray] = {}
        if coverage is not None:
            sets = self.conformal.sets(p, coverage)
            out["prediction_set"] = sets
            out["set_size"] = sets.sum(axis=1, dtype=np.int64)
        if max_risk is not None:
            out["abstained"] = p.max(axis=1) < self.selective.threshold(max_risk)
        return out
