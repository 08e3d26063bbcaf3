"""The vote, restated row by row from its documentation (docs/repository.md, the policy
table) in plain Python over numpy rows: the end-to-end tests' expected answers, written
independently of service.ensemble.voting (which is vectorised over rows and has its own
unit tests). Slow on purpose: clarity over speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACCURACY_CLIP = 1e-3  # accuracies are clipped to [0.001, 0.999] before their log-odds


@dataclass(frozen=True)
class ExpectedVote:
    label_index: np.ndarray      # (n,)
    probabilities: np.ndarray    # (n, C)
    confidence: np.ndarray       # (n,)
    agreement: np.ndarray        # (n,)
    member_labels: np.ndarray    # (M, n)
    member_weights: np.ndarray   # (M, n)


def _row_weights(policy: str, row_probs: list[np.ndarray], accuracies: list[float],
                 given: list[float] | None) -> list[float]:
    """Each member's raw weight for one row, before normalising to sum 1."""
    if policy == "stacked":  # fitted when the ensemble loads (GetStatus.stacked_weights)
        return list(given) if given is not None else [1.0] * len(row_probs)
    if policy == "soft":
        return [1.0] * len(row_probs)
    if policy == "confidence":  # a calibrated member's top probability: its expected accuracy
        return [float(max(p)) for p in row_probs]
    if policy == "confidence_entropy":  # 1 - H(p) / log C
        weights = []
        for p in row_probs:
            entropy = -sum(float(q) * math.log(float(q)) for q in p if q > 0)
            weights.append(min(1.0, max(0.0, 1.0 - entropy / math.log(len(p)))))
        return weights
    if policy == "accuracy":  # log-odds of validation accuracy, never negative
        weights = []
        for a in accuracies:
            a = min(max(a, ACCURACY_CLIP), 1 - ACCURACY_CLIP)
            weights.append(max(0.0, math.log(a / (1 - a))))
        return weights
    raise ValueError(policy)


def expected_vote(policy: str, member_probs: list[np.ndarray], accuracies: list[float],
                  given_weights: list[float] | None = None) -> ExpectedVote:
    """`member_probs`: each member's calibrated (n, C) probabilities, in member order."""
    n, classes = member_probs[0].shape
    m = len(member_probs)
    labels = np.zeros(n, dtype=np.int64)
    combined = np.zeros((n, classes))
    weights = np.zeros((m, n))
    own = np.array([[int(np.argmax(p[row])) for row in range(n)] for p in member_probs])
    for row in range(n):
        probs = [np.asarray(p[row], dtype=np.float64) for p in member_probs]
        if policy == "majority":
            counts = [sum(1 for k in range(m) if own[k, row] == c) for c in range(classes)]
            top = max(counts)
            tied = [c for c in range(classes) if counts[c] == top]
            # a tie goes to the tied class with the largest summed probability, then the lowest index
            labels[row] = max(tied, key=lambda c: (sum(float(p[c]) for p in probs), -c))
            combined[row] = [count / m for count in counts]
            weights[:, row] = 1.0 / m
            continue
        raw = _row_weights(policy, probs, accuracies, given_weights)
        total = sum(raw)
        share = [w / total for w in raw] if total > 0 else [1.0 / m] * m  # all zero: equal weights
        mix = sum(w * p for w, p in zip(share, probs))
        combined[row] = mix / mix.sum()
        labels[row] = int(np.argmax(combined[row]))
        weights[:, row] = share
    return ExpectedVote(labels, combined, combined.max(axis=1),
                        (own == labels[None, :]).mean(axis=0), own, weights)


def stacked_weights(validation: list[dict]) -> list[float]:
    """The `stacked` policy's member weights, fitted here from the members' stored validation
    replay (manifest `validation`: indices, labels, calibrated probabilities): the mixture
    weights with the least NLL of the true labels, by the classic fixed-point iteration
    w_m <- mean over rows of w_m p_m(y) / sum_k w_k p_k(y), run until it stops moving.
    Members are assumed to share their label order (the bundled ones do)."""
    common = set(validation[0]["indices"])
    for v in validation[1:]:
        common &= set(v["indices"])
    rows = sorted(common)
    truth = []
    for v in validation:
        where = {index: r for r, index in enumerate(v["indices"])}
        truth.append([max(float(v["probabilities"][where[i]][v["labels"][where[i]]]), 1e-300) for i in rows])
    p = np.array(truth)  # (M, n) each member's probability of the true label
    w = np.ones(len(validation)) / len(validation)
    while True:
        pooled = (w[:, None] * p).sum(axis=0)
        new = (w[:, None] * p / pooled).mean(axis=1)
        if np.max(np.abs(new - w)) < 1e-14:
            return list(new / new.sum())
        w = new


def recalibrated(vote: ExpectedVote, temperature: float) -> ExpectedVote:
    """The ensemble's own vote calibration: softmax(log(p + 1e-6) / T); the winner stays."""
    z = np.log(vote.probabilities + 1e-6) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return ExpectedVote(vote.label_index, p, p[np.arange(len(p)), vote.label_index], vote.agreement,
                        vote.member_labels, vote.member_weights)
