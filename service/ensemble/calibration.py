"""Calibrating the vote itself: calibrated members do not make a calibrated vote.

Averaging members that disagree flattens the combined distribution (under-confident), a
hard vote's shares are coarse, and a confidence-weighted mean is neither. So, when an
ensemble loads, one temperature per voting policy is fitted on the validation replay (the
members' stored, label-aligned, calibrated validation probabilities through the vote), by
minimising the NLL of the true labels:

    q = softmax(log(p + EPS) / T)

`EPS` keeps a class that no member voted for (majority) or that every member ruled out
finite, so a confident mistake costs a bounded log-loss. The transform is monotone in p
within a row, so the winner and every ranking stay the vote's; only confidences move.
Applying it is one vectorised op per batch.

The `stacked` policy's member weights are fitted first, on the same replay: the weights
(non-negative, summing to 1) whose weighted mean of the members' probabilities gives the
true labels the least NLL (a linear pool, or stacking). The NLL of a mixture is convex in
its weights, so the optimum found is the optimum; weak or redundant members get weight 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from service.ensemble.voting import Policy, Vote, vote
from service.repository.contract import EnsembleSpec
from service.repository.manifest import VariantManifest

EPS = 1e-6
ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class PolicyCalibration:
    """The vote temperature of one policy and what it did on the validation replay."""

    policy: str
    temperature: float
    rows: int
    accuracy: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p + EPS) / T) over the last axis, in float64."""
    z = np.log(np.asarray(probabilities, dtype=np.float64) + EPS)
    z /= temperature
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width confidence bins (lo, hi]:
    sum over bins of (bin share of rows) * |bin accuracy - bin mean confidence|."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = np.argmax(probs, axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True puts a confidence exactly on an edge into the bin it closes: (lo, hi].
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


def _nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(labels.size), labels]
    return float(-np.mean(np.log(np.maximum(picked, 1e-300))))


def fit(policy: str, probabilities: np.ndarray, labels: np.ndarray) -> PolicyCalibration:
    """The NLL-minimising temperature (searched on log T) for a vote's probabilities (n, C);
    T = 1 when the fit does not lower the NLL."""
    labels = np.asarray(labels, dtype=np.int64)
    log_p = np.log(np.asarray(probabilities, dtype=np.float64) + EPS)

    def loss(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(labels.size), labels]))

    result = minimize_scalar(loss, bounds=(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])), method="bounded",
                             options={"xatol": 1e-5})
    temperature = float(np.exp(result.x)) if loss(result.x) < loss(0.0) else 1.0
    after = scale(probabilities, temperature)
    return PolicyCalibration(
        policy, temperature, int(labels.size),
        accuracy=float(np.mean(np.argmax(probabilities, axis=1) == labels)),
        ece_before=ece(probabilities, labels), ece_after=ece(after, labels),
        nll_before=_nll(np.asarray(probabilities, dtype=np.float64), labels), nll_after=_nll(after, labels))


def fit_pool_weights(probabilities: Sequence[np.ndarray], labels: np.ndarray,
                     tolerance: float = 1e-13, max_iterations: int = 200_000) -> np.ndarray:
    """Member weights (summing to 1) of the linear pool with the least NLL of `labels`.

    Expectation-maximisation for mixture weights: each step moves every weight to its
    member's average share of the pooled probability of the truth, never raises the NLL,
    and converges to the optimum, zero weights included (a gradient method in a softmax
    parametrisation only approaches those). A few thousand steps on a few hundred rows:
    milliseconds to a fraction of a second, once per load."""
    labels = np.asarray(labels, dtype=np.int64)
    truth = np.stack([np.asarray(p, dtype=np.float64)[np.arange(labels.size), labels] for p in probabilities])
    truth = np.maximum(truth, 1e-300)
    w = np.full(len(probabilities), 1.0 / len(probabilities))
    for _ in range(max_iterations):
        updated = (w[:, None] * truth / (w @ truth)).mean(axis=1)
        if np.abs(updated - w).max() < tolerance:
            return updated / updated.sum()
        w = updated
    return w / w.sum()


@dataclass(frozen=True)
class VoteCalibration:
    """Per-policy vote temperatures of one ensemble (fitted on its configured members), and
    the `stacked` policy's member weights."""

    members: tuple[str, ...]
    policies: Mapping[str, PolicyCalibration]
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Member -> `stacked` weight; a member without one weighs 1 (equal weights)."""

    def weights_of(self, members: Sequence[str]) -> list[float]:
        return [self.weights.get(m, 1.0) for m in members]

    @classmethod
    def fit(cls, members: Sequence[str], probabilities: Mapping[str, np.ndarray], labels: np.ndarray,
            validation_accuracy: Mapping[str, float]) -> "VoteCalibration":
        """`probabilities`: each member's calibrated validation probabilities on the same rows,
        in the ensemble's class order; `labels`: those rows' true class indices."""
        names = [m for m in members if m in probabilities]
        fitted, weights = {}, {}
        if len(names) >= 2 and labels.size:
            pool = fit_pool_weights([probabilities[m] for m in names], labels)
            weights = {m: float(w) for m, w in zip(names, pool)}
            for policy in Policy:
                combined = vote(policy, [probabilities[m] for m in names], names,
                                validation_accuracy=[validation_accuracy[m] for m in names],
                                member_weights=list(pool))
                fitted[policy.value] = fit(policy.value, combined.probabilities, labels)
        return cls(tuple(names), fitted, weights)

    def apply(self, result: Vote) -> Vote:
        """The vote with its probabilities and confidence calibrated; a lone member's answer
        (already calibrated, and not what the temperature was fitted on) is left as it is."""
        calibration = self.policies.get(result.policy.value)
        if calibration is None or len(result.members) < 2 or calibration.temperature == 1.0:
            return result
        probabilities = scale(result.probabilities, calibration.temperature)
        rows = np.arange(result.label_index.shape[0])
        return dataclasses.replace(result, probabilities=probabilities,
                                   confidence=probabilities[rows, result.label_index])


NO_CALIBRATION = VoteCalibration((), {})


def aligned_validation(spec: EnsembleSpec, manifests: Mapping[str, VariantManifest]
                       ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Members' stored calibrated validation probabilities on the rows they all share, in
    the ensemble's class order, and those rows' true labels (as ensemble class indices)."""
    names = list(manifests)
    if not names:
        return {}, np.zeros(0, dtype=np.int64)
    common = set(manifests[names[0]].validation.indices)
    for name in names[1:]:
        common &= set(manifests[name].validation.indices)
    order = sorted(common)
    probabilities, labels = {}, np.zeros(0, dtype=np.int64)
    for name in names:
        validation = manifests[name].validation
        position = {index: row for row, index in enumerate(validation.indices)}
        rows = np.fromiter((position[i] for i in order), dtype=np.int64, count=len(order))
        probabilities[name] = spec.align(name, np.asarray(validation.probabilities, dtype=np.float64)[rows])
        labels = spec.align_labels(name, np.asarray(validation.labels, dtype=np.int64)[rows])
    return probabilities, labels


def fit_vote_calibration(spec: EnsembleSpec, manifests: Mapping[str, VariantManifest]) -> VoteCalibration:
    """Vote temperatures for every policy, on the replay of the members' validation rows."""
    probabilities, labels = aligned_validation(spec, manifests)
    accuracy = {m: manifests[m].validation.calibrated.accuracy for m in manifests}
    return VoteCalibration.fit(list(manifests), probabilities, labels, accuracy)
